"""An imported state blob is bounded by its session's size, counted against the memory
caps while it is buffered, and an HTTP one that stalls is refused."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.service import OptimizerService
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.convert import import_limit
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.http import HttpServerThread, create_app
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

CONFIG = SessionConfig("adam", (TensorSpec("w", (4,)),))


@pytest.fixture
def service() -> Iterator[OptimizerService]:
    svc = OptimizerService(SessionStore(CpuBackend(), None, Limits(max_state_bytes=256 << 20)))
    svc.start()
    svc.create("s", CONFIG)
    yield svc


def test_an_http_import_past_the_sessions_bound_is_refused_unread(
        service: OptimizerService) -> None:
    with HttpServerThread(create_app(service)) as http:
        limit = import_limit(service.describe("s").state_bytes)
        host, port = http.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(f"PUT /v2/sessions/s/state HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/octet-stream\r\nContent-Length: {limit + 1}\r\n\r\n"
                         .encode())
            answer = _response(conn)
        assert answer.startswith("HTTP/1.1 413") and f"at most {limit}" in answer


def test_a_stalled_http_import_is_refused_and_gives_its_bytes_back(
        service: OptimizerService) -> None:
    before = service.store.total_bytes()
    with HttpServerThread(create_app(service, body_idle_timeout=0.5)) as http:
        host, port = http.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"PUT /v2/sessions/s/state HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
                         + b"x" * 100_000)
            deadline = time.monotonic() + 5
            while service.store.total_bytes() == before and time.monotonic() < deadline:
                time.sleep(0.01)
            held = service.store.total_bytes() - before
            assert 0 < held <= 100_000  # what arrived is counted while it waits
            answer = _response(conn)
        assert answer.startswith("HTTP/1.1 400") and "sent nothing for 0.5 s" in answer
    assert service.store.total_bytes() == before


def test_a_grpc_import_counts_what_it_buffers(service: OptimizerService) -> None:
    server, port = build_grpc_server(service, port=0)
    before = service.store.total_bytes()
    release = threading.Event()

    def requests() -> Iterator[pb.ImportStateRequest]:
        yield pb.ImportStateRequest(session_id="s", data=b"x" * 1_000_000)
        release.wait(10)  # the stream stays open: its first message is buffered

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.OptimizerServiceStub(channel)
    future = stub.ImportState.future(requests())
    deadline = time.monotonic() + 5
    while service.store.total_bytes() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.store.total_bytes() - before == 1_000_000
    release.set()
    with pytest.raises(grpc.RpcError) as refused:  # not a state blob
        future.result(timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert service.store.total_bytes() == before
    channel.close()
    server.stop(None)


def _response(conn: socket.socket) -> str:
    """A whole HTTP response: its head, then as many bytes as its Content-Length says."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()
