"""End-to-end step cost on loopback, as ratios to a raw TCP round trip of the same bytes.

One run starts a real ``adamserve serve`` process (CPU backend) and prints:

* floor: the gradient bytes sent and the parameter bytes returned over one plain
  TCP socket to an echo process (no framing, no decoding);
* one step of a 16M-parameter fp32 Adam session over gRPC (the Step stream,
  4 MiB chunks), over HTTP (binary body), and over gRPC with BF16 on the wire both
  ways -- each as a ratio to the fp32 floor;
* with ``adamserve_client`` installed, the same step through the Python client;
* p50 / p99 latency of one step of a 1,000-parameter session on gRPC (StepUnary, and
  the Step stream) and HTTP.

    python bench/e2e.py [--params 16777216] [--repeat 5] [--small-steps 500]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np

from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pbg

CHUNK = 4 << 20


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    ports = tmp / "ports.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0", "--http-port", "0",
         "--data-dir", str(tmp / "data"), "--ports-file", str(ports), "--log-level", "WARNING"])
    deadline = time.monotonic() + 60
    while not ports.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    p = json.loads(ports.read_text())
    return proc, p["grpc"], p["http"]


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# -- floor: raw TCP round trip ----------------------------------------------------


def _echo_server(sock: socket.socket, out_bytes: int) -> None:
    conn, _ = sock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    reply = bytes(out_bytes)
    while True:
        header = conn.recv(8, socket.MSG_WAITALL)
        if len(header) < 8:
            return
        need = int.from_bytes(header, "little")
        while need:
            n = conn.recv_into(buf, min(len(buf), need))
            need -= n
        conn.sendall(reply)


def tcp_floor(in_bytes: int, out_bytes: int, repeat: int) -> float:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    threading.Thread(target=_echo_server, args=(lsock, out_bytes), daemon=True).start()
    c = socket.create_connection(lsock.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = bytes(in_bytes)
    buf = bytearray(out_bytes)

    def once() -> None:
        c.sendall(len(payload).to_bytes(8, "little"))
        c.sendall(payload)
        view = memoryview(buf)
        got = 0
        while got < out_bytes:
            got += c.recv_into(view[got:], out_bytes - got)

    t = timed(once, repeat)
    c.close()
    return t


# -- gRPC ---------------------------------------------------------------------


def grpc_create(stub: pbg.OptimizerServiceStub, sid: str, n: int) -> None:
    spec = pb.SessionSpec(session_id=sid, algorithm=pb.ALGORITHM_ADAM,
                          tensors=[pb.TensorSpec(name="w", shape=[n])])
    stub.CreateSession(iter([pb.CreateSessionRequest(spec=spec)]))


def grpc_requests(sid: str, data: bytes, n: int, datatype: str,
                  ret: str) -> Iterator[pb.StepRequest]:
    yield pb.StepRequest(header=pb.StepHeader(session_id=sid, return_datatype=ret))
    itemsize = len(data) // n
    per = CHUNK // itemsize
    view = memoryview(data)
    for off in range(0, n, per):
        part = view[off * itemsize:(off + per) * itemsize]
        yield pb.StepRequest(chunk=pb.TensorChunk(name="w", shape=[n], datatype=datatype,
                                                  offset=off, data=bytes(part)))


def grpc_step(stub: pbg.OptimizerServiceStub, sid: str, data: bytes, n: int, datatype: str,
              ret: str) -> int:
    received = 0
    for msg in stub.Step(grpc_requests(sid, data, n, datatype, ret)):
        if msg.HasField("param"):
            received += len(msg.param.data)
    return received


def grpc_step_unary(stub: pbg.OptimizerServiceStub, sid: str, data: bytes) -> int:
    n = len(data) // 4
    reply = stub.StepUnary(pb.StepUnaryRequest(
        header=pb.StepHeader(session_id=sid),
        gradients=[pb.TensorChunk(name="w", shape=[n], datatype="FP32", data=data)]))
    return sum(len(p.data) for p in reply.params)


# -- HTTP ---------------------------------------------------------------------


def http_create(c: httpx.Client, sid: str, n: int) -> None:
    r = c.post("/v2/sessions", json={"session_id": sid, "algorithm": "ALGORITHM_ADAM",
                                     "tensors": [{"name": "w", "shape": [n]}]})
    r.raise_for_status()


def http_step(c: httpx.Client, sid: str, data: bytes, n: int) -> int:
    head = json.dumps({"gradients": [{"name": "w", "shape": [n], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(data)}}],
                       "binary_output": True}).encode()
    r = c.post(f"/v2/sessions/{sid}/step", content=head + data,
               headers={"content-type": "application/octet-stream",
                        "adamserve-header-length": str(len(head))})
    r.raise_for_status()
    return len(r.content)


def latency(fn: Callable[[], object], count: int) -> tuple[float, float]:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--small-steps", type=int, default=500)
    args = ap.parse_args()
    n = args.params
    rng = np.random.default_rng(0)
    g32 = (rng.standard_normal(n, dtype=np.float32) * 1e-3).astype("<f4").tobytes()
    g16 = (np.frombuffer(g32, "<u4") >> 16).astype("<u2").tobytes()  # BF16 bits
    small = (rng.standard_normal(1000, dtype=np.float32) * 1e-3).tobytes()

    with tempfile.TemporaryDirectory() as tmp:
        proc, gport, hport = start_server(Path(tmp))
        try:
            opts = [("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]
            chan = grpc.insecure_channel(f"127.0.0.1:{gport}", options=opts)
            stub = pbg.OptimizerServiceStub(chan)
            http = httpx.Client(base_url=f"http://127.0.0.1:{hport}", timeout=120)
            grpc_create(stub, "big", n)
            grpc_create(stub, "small", 1000)
            http_create(http, "big-http", n)
            http_create(http, "small-http", 1000)

            floor = tcp_floor(len(g32), len(g32), args.repeat)
            floor16 = tcp_floor(len(g16), len(g16), args.repeat)
            t_grpc = timed(lambda: grpc_step(stub, "big", g32, n, "FP32", "FP32"), args.repeat)
            t_bf16 = timed(lambda: grpc_step(stub, "big", g16, n, "BF16", "BF16"), args.repeat)
            t_http = timed(lambda: http_step(http, "big-http", g32, n), args.repeat)
            t_client = client_step(gport, n, g32, args.repeat)
            g50, g99 = latency(lambda: grpc_step_unary(stub, "small", small), args.small_steps)
            s50, s99 = latency(lambda: grpc_step(stub, "small", small, 1000, "FP32", "FP32"),
                               args.small_steps)
            h50, h99 = latency(lambda: http_step(http, "small-http", small, 1000),
                               args.small_steps)
        finally:
            proc.terminate()
            proc.wait(60)

    mb = len(g32) / 1e6
    print(f"# e2e: {n} fp32 params ({mb:.0f} MB each way), loopback, "
          f"{os.cpu_count()} cpus, server on the CPU backend\n")
    print("| path | seconds per step | ratio to fp32 TCP floor | target |")
    print("|---|---|---|---|")
    print(f"| raw TCP round trip, fp32 bytes (floor) | {floor:.3f} | 1.00 | |")
    print(f"| raw TCP round trip, bf16 bytes | {floor16:.3f} | {floor16 / floor:.2f} | |")
    print(f"| gRPC Step stream, fp32 | {t_grpc:.3f} | {t_grpc / floor:.2f} | <= 2 |")
    print(f"| HTTP binary body, fp32 | {t_http:.3f} | {t_http / floor:.2f} | <= 3 |")
    print(f"| gRPC Step stream, bf16 both ways | {t_bf16:.3f} | {t_bf16 / floor:.2f} | <= 1 |")
    if t_client == t_client:  # not NaN
        print(f"| Python client (gRPC), fp32 | {t_client:.3f} | {t_client / floor:.2f} | "
              f"<= 1.1 x gRPC ({t_client / t_grpc:.2f}) |")
    print("\n| 1,000-parameter step | p50 ms | p99 ms | target p50 |")
    print("|---|---|---|---|")
    print(f"| gRPC StepUnary | {g50 * 1e3:.3f} | {g99 * 1e3:.3f} | <= 0.5 |")
    print(f"| gRPC Step stream | {s50 * 1e3:.3f} | {s99 * 1e3:.3f} | |")
    print(f"| HTTP | {h50 * 1e3:.3f} | {h99 * 1e3:.3f} | <= 1 |")


def client_step(gport: int, n: int, g32: bytes, repeat: int) -> float:
    """The same step through adamserve_client's NumPy mode; NaN if it is unavailable."""
    try:
        import adamserve_client
    except ImportError:
        return float("nan")
    if not hasattr(adamserve_client, "Adam"):
        return float("nan")
    w = np.zeros(n, dtype=np.float32)
    g = np.frombuffer(g32, dtype="<f4")
    opt = adamserve_client.Adam([w], lr=1e-3, server=f"grpc://127.0.0.1:{gport}",
                                session="client-bench")
    return timed(lambda: opt.step([g]), repeat)


if __name__ == "__main__":
    main()
