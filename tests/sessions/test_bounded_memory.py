"""--max-state-bytes bounds what requests make the server hold, not only the sessions.

The attacks of the red-team pass, bounded: the workers of a synchronous session each
waiting for its round, and two AddTensors racing for the last free bytes. The server
is real (gRPC on 127.0.0.1, port 0) and in this process, so its RSS can be read from
/proc/self; the workers run in a child process, so their own buffers are not in it.

Measured on the 2-core test machine (docs/security.md, "Bounded resources"): with 23
of 24 workers waiting, 16 MiB gradients each, the server's peak RSS grew by 58-91 MiB
(466 MiB before the fix: each waiter kept its decoded gradient and its last message).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc.error_details_pb2 import ErrorInfo
from grpc_status import rpc_status

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.grpc import build_grpc_server
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

MiB = 1 << 20
ADAM = pb.Algorithm.Value("ALGORITHM_ADAM")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * MiB),
                   ("grpc.max_receive_message_length", 64 * MiB)]
# What the server's RSS may grow by beyond the free room under the cap while workers
# wait: the push in flight's messages, the transport's buffers and the allocator's
# slack (measured: 58-91 MiB, the 16 MiB gradient being decoded included; 466 MiB
# before the fix, when each of the 23 waiters kept its gradient).
OVERHEAD = 128 * MiB


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Hand freed heap pages back (else the next allocations reuse them unseen), then
    start VmHWM (the peak RSS) again from the current RSS."""
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # glibc's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@contextmanager
def _server(cap: int) -> Iterator[tuple[SessionStore, pb_grpc.OptimizerServiceStub, int]]:
    store = SessionStore(CpuBackend(), None, Limits(max_state_bytes=cap))
    service = OptimizerService(store)
    service.start()
    server, port = build_grpc_server(service, port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        yield store, pb_grpc.OptimizerServiceStub(channel), port
    finally:
        channel.close()
        server.stop(None)


def _create(stub: pb_grpc.OptimizerServiceStub, sid: str, numel: int, workers: int = 1) -> None:
    stub.CreateSession(iter([pb.CreateSessionRequest(spec=pb.SessionSpec(
        session_id=sid, algorithm=ADAM, tensors=[pb.TensorSpec(name="w", shape=[numel])],
        workers=pb.Workers(count=workers)))]))


def _refusal(err: grpc.RpcError) -> ErrorInfo:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


# -- the workers, in a child process ------------------------------------------------

PIECE = 1 << 20  # elements per message (4 MiB)


def _step_messages(sid: str, numel: int, worker: int, sequence: int) -> Iterator[pb.StepRequest]:
    yield pb.StepRequest(header=pb.StepHeader(session_id=sid, return_datatype="FP32",
                                              worker_id=f"w{worker}", sequence=sequence))
    grad = np.full(numel, 0.01 * (worker + 1), np.float32).tobytes()
    for lo in range(0, numel, PIECE):
        yield pb.StepRequest(chunk=pb.TensorChunk(name="w", shape=[numel], datatype="FP32",
                                                  offset=lo, data=grad[lo * 4:(lo + PIECE) * 4]))


def _workers(port: int, sid: str, numel: int, conn: multiprocessing.connection.Connection
             ) -> None:
    """Run each (worker, sequence) the parent sends as a Step in a thread of its own; send
    back (worker, sequence, step or the refusal's reason) as each ends."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = pb_grpc.OptimizerServiceStub(channel)
    lock = threading.Lock()

    def run(worker: int, sequence: int) -> None:
        try:
            replies = list(stub.Step(_step_messages(sid, numel, worker, sequence)))
            outcome: Any = replies[0].status.step
        except grpc.RpcError as err:
            outcome = _refusal(err).reason
        with lock:
            conn.send((worker, sequence, outcome))

    while (order := conn.recv()) is not None:
        threading.Thread(target=run, args=order, daemon=True).start()
    channel.close()


@contextmanager
def _worker_process(port: int, sid: str, numel: int
                    ) -> Iterator[multiprocessing.connection.Connection]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_workers, args=(port, sid, numel, child), daemon=True)
    proc.start()
    try:
        yield parent
    finally:
        parent.send(None)
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def _until(what: str, done: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_waiting_workers_hold_no_gradient_and_the_push_past_the_cap_is_refused() -> None:
    workers, numel = 24, 4 << 20  # 16 MiB gradients
    grad_bytes = numel * 4
    state = 4 * grad_bytes + (1 << 10)  # adam: param, grad, exp_avg, exp_avg_sq; overhead
    rounds = numel * (8 + 4)  # the round's float64 sum and its float32 mean
    cap = state + rounds + grad_bytes * 3 // 2  # room for one push being decoded
    with _server(cap) as (store, stub, port):
        _create(stub, "s", numel, workers)
        session = store.get("s")
        state = session.state_bytes

        def arrived() -> int:
            r = session.rounds.current
            return 0 if r is None else r.arrived

        with _worker_process(port, "s", numel) as conn:
            def push(worker: int, sequence: int) -> None:
                before = arrived()
                conn.send((worker, sequence))
                _until(f"worker {worker}'s push", lambda: arrived() > before or conn.poll())

            # round 1 warms up (the round's buffers, the kernels' compilation)
            for w in range(workers):
                push(w, 1)
            assert sorted(conn.recv() for _ in range(workers)) == [
                (w, 1, 1) for w in range(workers)]
            _reset_peak()
            base = _status("VmRSS")
            counted = store.total_bytes()
            for w in range(workers - 1):  # round 2: all but the last wait for it
                push(w, 2)
            assert arrived() == workers - 1 and not conn.poll()
            peak = _status("VmHWM") - base
            assert peak <= cap - counted + OVERHEAD, (
                f"{workers - 1} waiting workers grew the RSS by {peak / MiB:.0f} MiB; "
                f"the cap leaves {(cap - counted) / MiB:.0f} MiB (+{OVERHEAD / MiB:.0f})")
            # the round's buffers are counted; a waiting worker holds nothing
            assert store.total_bytes() == counted == state + rounds

            # a filler session takes the room the last push needs: that push is refused
            # before its buffer is allocated, and the round keeps its 23 pushes
            _create(stub, "filler", (cap - counted - grad_bytes // 2) // 16)
            before = session.fingerprint()
            conn.send((workers - 1, 2))
            worker, sequence, reason = conn.recv()
            assert (worker, sequence, reason) == (workers - 1, 2, "QUOTA_EXCEEDED")
            assert arrived() == workers - 1 and session.fingerprint() == before
            stub.DeleteSession(pb.DeleteSessionRequest(session_id="filler"))

            conn.send((workers - 1, 2))  # again, with room: the round completes
            assert sorted(conn.recv() for _ in range(workers)) == [
                (w, 2, 2) for w in range(workers)]
            assert store.total_bytes() == state + rounds


def test_the_refusal_names_the_bytes_and_the_cap() -> None:
    numel = 1 << 20
    state = 4 * numel * 4 + (1 << 10)  # and the per-tensor overhead
    cap = state + numel * 3  # a 4 MiB push does not fit
    with _server(cap) as (store, stub, _):
        _create(stub, "s", numel, workers=2)
        state = store.get("s").state_bytes
        before = store.get("s").fingerprint()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Step(_step_messages("s", numel, 0, 1), timeout=30))
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _refusal(err).reason == "QUOTA_EXCEEDED"
        assert f"needs {numel * 4} more bytes" in (err.details() or "")
        assert f"{cap - state} of {cap} are free" in (err.details() or "")
        assert store.get("s").fingerprint() == before and store.get("s").round is None
        assert store.total_bytes() == state  # nothing held once refused


def test_two_concurrent_add_tensors_at_the_cap_exactly_one_wins() -> None:
    """Both requests start (the end of their streams held back), then both go on at once:
    the growth each needs fits the cap once, not twice. (Before the fix both checked the
    cap before either had allocated, and both grew: 128 MiB past it.)"""
    numel, grow = 1 << 16, 8 << 20
    with _server(1 << 40) as (probe, stub, _):  # what a session and its growth take
        _create(stub, "p", numel)
        state = probe.get("p").state_bytes
    added = 4 * grow * 4 + grow * 4 + 2048  # adam's buffers of the new tensor, its values
    cap = 2 * state + added + added // 2
    with _server(cap) as (store, stub, _):
        for sid in ("a", "b"):
            _create(stub, sid, numel)
        fingerprints = {sid: store.get(sid).fingerprint() for sid in ("a", "b")}
        go = threading.Event()

        def requests(sid: str) -> Iterator[pb.AddTensorsRequest]:
            yield pb.AddTensorsRequest(spec=pb.AddTensorsSpec(
                session_id=sid, tensors=[pb.TensorSpec(name="new", shape=[grow])]))
            go.wait(30)  # no initial values: the new tensor starts at zero

        outcomes: dict[str, str] = {}

        def add(sid: str) -> None:
            try:
                stub.AddTensors(requests(sid), timeout=30)
                outcomes[sid] = "ok"
            except grpc.RpcError as err:
                outcomes[sid] = _refusal(err).reason

        threads = [threading.Thread(target=add, args=(sid,)) for sid in ("a", "b")]
        for t in threads:
            t.start()
        # both requests are in (their streams open) unless one was refused already
        end = time.monotonic() + 2.0
        while not outcomes and time.monotonic() < end:
            time.sleep(0.01)
        go.set()
        for t in threads:
            t.join(30)
        assert sorted(outcomes.values()) == ["QUOTA_EXCEEDED", "ok"], outcomes
        loser = next(sid for sid, o in outcomes.items() if o != "ok")
        assert store.get(loser).fingerprint() == fingerprints[loser]
        assert store.total_bytes() <= cap
