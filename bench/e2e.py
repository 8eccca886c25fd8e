"""End-to-end step cost on loopback, as ratios to a raw TCP round trip of the same bytes.

One run starts a real ``adamserve serve`` process (CPU backend) and prints:

* floor: the gradient bytes sent and the parameter bytes returned over one plain
  TCP socket to an echo process (no framing, no decoding);
* one step of a 16M-parameter fp32 Adam session over gRPC (the Step stream,
  4 MiB chunks written and read with ``adamserve_proto.wire``, as the Python
  client does, the parameters copied into one buffer; and once more with protobuf
  message objects both ways), over HTTP
  (binary body), and with BF16 on the wire both ways over each -- each as a ratio
  to the fp32 floor;
* the same step over Arrow Flight (one DoExchange: record batches of
  ``adamserve_proto.flight``'s layout each way, the parameters copied into one
  buffer), fp32 and bf16;
* with ``adamserve_client`` installed, the same step through the Python client
  (gRPC fp32 and bf16; HTTP fp32; Flight fp32 on one stream and on four; gRPC with
  ``shared_memory=True``, against the engine's own step of the same session in
  this process);
* p50 / p99 latency of one step of a 1,000-parameter session on gRPC (StepUnary,
  the Step stream, and StepUnary through the Python client), Flight (DoExchange,
  and the Python client) and HTTP;
* a row-sparse step of a SparseAdam session holding a 1M x 64 embedding, touching 1%
  of its rows (their values in, the same rows back: ``return_rows``), against the
  dense step of the same session (every row both ways), over each wire through the
  client's transports: bytes on the wire and seconds, as ratios.

    python bench/e2e.py [--params 16777216] [--repeat 5] [--small-steps 500]
                        [--only-row-sparse] [--embedding-rows 1000000]
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
from typing import Any

import grpc
import httpx
import numpy as np
import pyarrow.flight as fl

from adamserve_proto import flight as layout
from adamserve_proto import wire
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pbg

CHUNK = 4 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = tmp / "ports.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0", "--http-port", "0",
         "--flight-port", str(_free_port()), "--allow-shared-memory",
         "--data-dir", str(tmp / "data"), "--ports-file", str(ports),
         "--log-level", "WARNING"])
    deadline = time.monotonic() + 60
    while not ports.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    p = json.loads(ports.read_text())
    return proc, {k: int(p[k]) for k in ("grpc", "http", "flight")}


def timed(rows: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Seconds per call of each row: the best of ``repeat`` rounds that call every row
    once in turn (after one warm-up call each), so that the load of a noisy machine
    falls on all rows alike."""
    for fn in rows.values():
        fn()
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(repeat):
        for key, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


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


def tcp_floor(in_bytes: int, out_bytes: int) -> Callable[[], None]:
    """One round trip of the bytes over a plain socket to an echo thread."""
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

    return once


# -- gRPC ---------------------------------------------------------------------


def grpc_create(stub: pbg.OptimizerServiceStub, sid: str, n: int) -> None:
    spec = pb.SessionSpec(session_id=sid, algorithm=pb.ALGORITHM_ADAM,
                          tensors=[pb.TensorSpec(name="w", shape=[n])])
    stub.CreateSession(iter([pb.CreateSessionRequest(spec=spec)]))


def grpc_requests(sid: str, data: bytes, n: int, datatype: str,
                  ret: str) -> Iterator[pb.StepRequest]:
    """The Step stream as protobuf message objects (each chunk's data copied into one)."""
    yield pb.StepRequest(header=pb.StepHeader(session_id=sid, return_datatype=ret))
    itemsize = len(data) // n
    per = CHUNK // itemsize
    view = memoryview(data)
    for off in range(0, n, per):
        part = view[off * itemsize:(off + per) * itemsize]
        yield pb.StepRequest(chunk=pb.TensorChunk(name="w", shape=[n], datatype=datatype,
                                                  offset=off, data=bytes(part)))


def grpc_step_protobuf(stub: pbg.OptimizerServiceStub, sid: str, data: bytes, n: int,
                       datatype: str, ret: str) -> int:
    received = 0
    for msg in stub.Step(grpc_requests(sid, data, n, datatype, ret)):
        if msg.HasField("param"):
            received += len(msg.param.data)
    return received


def lean_step_stub(chan: grpc.Channel) -> Callable[[Iterator[bytes]], Iterator[object]]:
    """The Step method with requests serialised by adamserve_proto.wire and the parameter
    chunks read by it (their data views into the received messages)."""
    def read(raw: bytes) -> object:
        return wire.read_chunk_message(raw, wire.STEP_PARAM) or pb.StepResponse.FromString(raw)

    return chan.stream_stream("/adamserve_proto.v2.OptimizerService/Step",
                              request_serializer=lambda b: b, response_deserializer=read)


def grpc_step(step: Callable[[Iterator[bytes]], Iterator[object]], sid: str, data: bytes,
              n: int, datatype: str, ret: str, out: bytearray) -> int:
    """One step; the parameters that come back are copied into ``out`` (where any client
    must put them), each chunk once."""
    def requests() -> Iterator[bytes]:
        yield pb.StepRequest(header=pb.StepHeader(session_id=sid, return_datatype=ret)
                             ).SerializeToString()
        yield from wire.chunk_messages("w", (n,), datatype, data, itemsize=len(data) // n,
                                       wrap=wire.STEP_CHUNK)

    received = 0
    view = memoryview(out)
    for msg in step(requests()):
        if isinstance(msg, wire.ChunkView):
            view[received:received + len(msg.data)] = msg.data
            received += len(msg.data)
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


def http_step(c: httpx.Client, sid: str, data: bytes, n: int, datatype: str = "FP32") -> int:
    head = json.dumps({"gradients": [{"name": "w", "shape": [n], "datatype": datatype,
                                      "parameters": {"binary_data_size": len(data)}}],
                       "return_datatype": datatype, "binary_output": True}).encode()
    view = memoryview(data)
    parts = [head, *(view[i:i + (1 << 20)] for i in range(0, len(view), 1 << 20))]
    r = c.post(f"/v2/sessions/{sid}/step", content=iter(parts),  # views: no joined copy
               headers={"content-type": "application/octet-stream",
                        "content-length": str(len(head) + len(data)),
                        "adamserve-header-length": str(len(head))})
    r.raise_for_status()
    return len(r.content)


# -- Arrow Flight -------------------------------------------------------------------


def flight_step(client: fl.FlightClient, sid: str, data: bytes, n: int, datatype: str,
                out: bytearray) -> int:
    """One DoExchange step; the parameters copied into ``out`` (as any client must)."""
    header = pb.StepHeader(session_id=sid, return_datatype=datatype)
    command = pb.FlightCommand(step=pb.StepRequest(header=header)).SerializeToString()
    writer, reader = client.do_exchange(fl.FlightDescriptor.for_command(command))
    writer.begin(layout.schema(datatype))
    for batch in layout.batches([("w", (n,), data, 0)], datatype):
        writer.write_batch(batch)
    writer.done_writing()
    view = memoryview(out)
    item = len(data) // n
    got = 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        if chunk.data is None:
            continue
        for row in layout.rows(chunk.data, datatype):
            lo = row.offset * item
            view[lo:lo + row.data.nbytes] = row.data
            got += row.data.nbytes
    writer.close()
    return got


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
    ap.add_argument("--only-row-sparse", action="store_true",
                    help="run only the row-sparse embedding steps")
    ap.add_argument("--embedding-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    if args.only_row_sparse:
        with tempfile.TemporaryDirectory() as tmp:
            proc, ports = start_server(Path(tmp))
            try:
                row_sparse(ports, args.embedding_rows, args.repeat)
            finally:
                proc.terminate()
                proc.wait(60)
        return
    n = args.params
    rng = np.random.default_rng(0)
    g32 = (rng.standard_normal(n, dtype=np.float32) * 1e-3).astype("<f4").tobytes()
    g16 = (np.frombuffer(g32, "<u4") >> 16).astype("<u2").tobytes()  # BF16 bits
    small = (rng.standard_normal(1000, dtype=np.float32) * 1e-3).tobytes()

    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = start_server(Path(tmp))
        gport, hport, fport = ports["grpc"], ports["http"], ports["flight"]
        try:
            opts = [("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]
            chan = grpc.insecure_channel(f"127.0.0.1:{gport}", options=opts)
            stub = pbg.OptimizerServiceStub(chan)
            lean = lean_step_stub(chan)
            http = httpx.Client(base_url=f"http://127.0.0.1:{hport}", timeout=120)
            grpc_create(stub, "big", n)
            grpc_create(stub, "small", 1000)
            http_create(http, "big-http", n)
            http_create(http, "small-http", 1000)
            grpc_create(stub, "big-flight", n)
            grpc_create(stub, "small-flight", 1000)
            flight = fl.connect(f"grpc://127.0.0.1:{fport}")
            out = bytearray(len(g32))  # where the raw clients put the parameters

            t = timed({
                "floor": tcp_floor(len(g32), len(g32)),
                "floor16": tcp_floor(len(g16), len(g16)),
                "grpc": lambda: grpc_step(lean, "big", g32, n, "FP32", "FP32", out),
                "grpc16": lambda: grpc_step(lean, "big", g16, n, "BF16", "BF16", out),
                "grpc-pb": lambda: grpc_step_protobuf(stub, "big", g32, n, "FP32", "FP32"),
                "http": lambda: http_step(http, "big-http", g32, n),
                "http16": lambda: http_step(http, "big-http", g16, n, "BF16"),
                "flight": lambda: flight_step(flight, "big-flight", g32, n, "FP32", out),
                "flight16": lambda: flight_step(flight, "big-flight", g16, n, "BF16", out),
                **client_steps(ports, n, g32),
                **engine_step(n, g32),
            }, args.repeat)
            g50, g99 = latency(lambda: grpc_step_unary(stub, "small", small), args.small_steps)
            s50, s99 = latency(lambda: grpc_step(lean, "small", small, 1000, "FP32", "FP32",
                                                 out), args.small_steps)
            c50, c99 = client_latency(gport, small, args.small_steps)
            h50, h99 = latency(lambda: http_step(http, "small-http", small, 1000),
                               args.small_steps)
            f50, f99 = latency(lambda: flight_step(flight, "small-flight", small, 1000, "FP32",
                                                   out), args.small_steps)
            cf50, cf99 = client_latency(fport, small, args.small_steps, "flight")
            sparse_table = row_sparse(ports, args.embedding_rows, args.repeat, show=False)
        finally:
            proc.terminate()
            proc.wait(60)

    mb = len(g32) / 1e6
    print(f"# e2e: {n} fp32 params ({mb:.0f} MB each way), loopback, "
          f"{os.cpu_count()} cpus, server on the CPU backend; best of {args.repeat} "
          "interleaved rounds\n")
    print("| path | seconds per step | ratio to fp32 TCP floor | target |")
    print("|---|---|---|---|")

    def row(path: str, key: str, target: str = "") -> None:
        print(f"| {path} | {t[key]:.3f} | {t[key] / t['floor']:.2f} | {target} |")

    def no_slower(key16: str, key32: str) -> str:
        return f"<= fp32 ({t[key16] / t[key32]:.2f} x fp32)"

    row("raw TCP round trip, fp32 bytes (floor)", "floor")
    row("raw TCP round trip, bf16 bytes", "floor16")
    row("gRPC Step stream, fp32", "grpc", "<= 4")
    row("gRPC Step stream, fp32, protobuf message objects", "grpc-pb")
    row("HTTP binary body, fp32", "http", "<= 5")
    row("gRPC Step stream, bf16 both ways", "grpc16", no_slower("grpc16", "grpc"))
    row("HTTP binary body, bf16 both ways", "http16", no_slower("http16", "http"))
    if "client" in t:
        row("Python client (gRPC), fp32", "client",
            f"<= 1.1 x gRPC ({t['client'] / t['grpc']:.2f})")
        row("Python client (gRPC), bf16 both ways", "client16", no_slower("client16", "client"))
    if "clienth" in t:
        row("Python client (HTTP), fp32", "clienth",
            f"<= 1.1 x HTTP ({t['clienth'] / t['http']:.2f})")
    row("Arrow Flight DoExchange, fp32", "flight", "<= 2 (stretch 1.5)")
    row("Arrow Flight DoExchange, bf16 both ways", "flight16",
        f"<= 1.2, {no_slower('flight16', 'flight')}")
    if "clientf" in t:
        row("Python client (Flight), fp32", "clientf",
            f"<= 1.1 x Flight ({t['clientf'] / t['flight']:.2f})")
        row("Python client (Flight, 4 streams), fp32", "clientf4",
            f"({t['clientf4'] / t['clientf']:.2f} x one stream)")
        row("engine step in this process (FlatOptimizer.step)", "engine")
        row("Python client (gRPC), shared_memory=True, fp32", "shm",
            f"<= 1.5 x engine ({t['shm'] / t['engine']:.2f}), < floor")
    print("\n| 1,000-parameter step | p50 ms | p99 ms | target p50 |")
    print("|---|---|---|---|")
    print(f"| gRPC StepUnary | {g50 * 1e3:.3f} | {g99 * 1e3:.3f} | <= 0.5 |")
    print(f"| gRPC Step stream | {s50 * 1e3:.3f} | {s99 * 1e3:.3f} | |")
    if c50 == c50:
        print(f"| Python client (gRPC StepUnary) | {c50 * 1e3:.3f} | {c99 * 1e3:.3f} | |")
    print(f"| HTTP | {h50 * 1e3:.3f} | {h99 * 1e3:.3f} | <= 1 |")
    print(f"| Arrow Flight DoExchange | {f50 * 1e3:.3f} | {f99 * 1e3:.3f} | |")
    if cf50 == cf50:
        print(f"| Python client (Flight: StepUnary action) | {cf50 * 1e3:.3f} | "
              f"{cf99 * 1e3:.3f} | <= 1 |")
    print(sparse_table)


def row_sparse(ports: dict[str, int], rows: int, repeat: int, show: bool = True,
               dim: int = 64, touched: float = 0.01) -> str:
    """A SparseAdam session of one ``rows`` x ``dim`` fp32 embedding per wire: its dense
    step (every row in, every row back) and a row-sparse step of ``touched`` of the
    rows (in, and back with ``return_rows``), through adamserve_client's transports;
    the table (printed when ``show``)."""
    from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect

    rng = np.random.default_rng(1)
    shape = (rows, dim)
    dense = WireTensor("emb", shape, "FP32",
                       (rng.standard_normal(shape, dtype=np.float32) * 1e-3).tobytes())
    ids = np.sort(rng.choice(rows, int(rows * touched), replace=False)).astype("<i8")
    values = (rng.standard_normal((len(ids), dim), dtype=np.float32) * 1e-3).tobytes()
    sparse = WireTensor("emb", shape, "FP32", values, ids.tobytes())
    dense_bytes = 2 * len(dense.data)  # every row in and back
    sparse_bytes = 2 * (len(values) + len(ids) * 8)  # the rows and their indices, both ways
    urls = {"gRPC": f"grpc://127.0.0.1:{ports['grpc']}",
            "HTTP": f"http://127.0.0.1:{ports['http']}",
            "Flight": f"flight://127.0.0.1:{ports['flight']}"}
    steps: dict[str, Callable[[], object]] = {}
    for wire_name, url in urls.items():
        t = connect(url, timeout=600)
        sid = f"rows-{wire_name}"
        t.create_session(SessionSpec(sid, "sparse_adam", (TensorSpec("emb", shape),)))
        steps[f"{wire_name} dense"] = lambda t=t, sid=sid: t.step(sid, [dense])
        steps[f"{wire_name} rows"] = lambda t=t, sid=sid: t.step(sid, [sparse],
                                                                  return_rows=True)
    t = timed(steps, repeat)
    lines = [f"\n# row-sparse: SparseAdam, a {rows} x {dim} fp32 embedding, {len(ids)} rows "
             f"({touched:.0%}) touched; best of {repeat}\n",
             "| wire | dense step s | row-sparse step s | bytes (rows / dense) | speed-up | "
             "target |", "|---|---|---|---|---|---|"]
    for wire_name in urls:
        d, r = t[f"{wire_name} dense"], t[f"{wire_name} rows"]
        lines.append(f"| {wire_name} | {d:.3f} | {r:.4f} | {sparse_bytes / dense_bytes:.2%} | "
                     f"{d / r:.1f}x | <= 2% bytes, >= 20x |")
    table = "\n".join(lines)
    if show:
        print(table)
    return table


def _client() -> Any:
    """adamserve_client, or None where it is not installed."""
    try:
        import adamserve_client
    except ImportError:
        return None
    return adamserve_client if hasattr(adamserve_client, "Adam") else None


def client_steps(ports: dict[str, int], n: int, g32: bytes
                 ) -> dict[str, Callable[[], object]]:
    """The same step through adamserve_client's NumPy mode: gRPC with fp32 ("client")
    and bf16 ("client16") on the wire, HTTP ("clienth"), Flight on one stream ("clientf") and on four
    ("clientf4"), gRPC with shared memory ("shm"); none if the client is unavailable."""
    client = _client()
    if client is None:
        return {}
    g = np.frombuffer(g32, dtype="<f4")
    grpc_url = f"grpc://127.0.0.1:{ports['grpc']}"
    http_url = f"http://127.0.0.1:{ports['http']}"
    flight_url = f"flight://127.0.0.1:{ports['flight']}"
    rows = {}
    for key, url, kw in (("client", grpc_url, {}),
                         ("client16", grpc_url, {"wire_dtype": "bfloat16"}),
                         ("clienth", http_url, {}),
                         ("clientf", flight_url, {}),
                         ("clientf4", flight_url + "?streams=4", {}),
                         ("shm", grpc_url, {"shared_memory": True})):
        w = np.zeros(n, dtype=np.float32)
        opt = client.Adam([w], lr=1e-3, server=url, session=f"bench-{key}", **kw)
        rows[key] = lambda o=opt: o.step([g])
    return rows


def engine_step(n: int, g32: bytes) -> dict[str, Callable[[], object]]:
    """The engine's own step of the same session (Adam, the non-finite check on, as the
    client's), in this process: what shared memory is measured against."""
    try:
        from adamserve.engine.kernels_cpu import CpuBackend
        from adamserve.engine.optimizer import TensorSpec
        from adamserve.service import OptimizerService
        from adamserve.sessions.session import SessionConfig
        from adamserve.sessions.store import Limits, SessionStore
    except ImportError:
        return {}
    store = SessionStore(CpuBackend(), None, Limits())
    OptimizerService(store).create("engine", SessionConfig("adam", (TensorSpec("w", (n,)),)))
    opt = store.get("engine").opt
    opt.grad[...] = np.frombuffer(g32, dtype="<f4")
    return {"engine": lambda: opt.step(None)}


def client_latency(port: int, small: bytes, count: int,
                   scheme: str = "grpc") -> tuple[float, float]:
    """p50 / p99 of a 1,000-parameter step through adamserve_client (StepUnary)."""
    client = _client()
    if client is None:
        return float("nan"), float("nan")
    w = np.zeros(1000, dtype=np.float32)
    g = np.frombuffer(small, dtype="<f4")
    opt = client.Adam([w], lr=1e-3, server=f"{scheme}://127.0.0.1:{port}",
                      session=f"client-bench-small-{scheme}")
    return latency(lambda: opt.step([g]), count)


if __name__ == "__main__":
    main()
