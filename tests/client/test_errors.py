"""Errors over both wires: the client's exception classes with the server's message,
its stable reason and metadata (google.rpc.ErrorInfo on gRPC, the body's ``reason`` on
HTTP), the client's own reasons, and bounded retries while a server is unavailable."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.transports import Client, SessionSpec, TensorSpec, connect
from adamserve_client.transports.base import Sender, Workers
from adamserve_client.transports.flight import FlightWire
from adamserve_client.transports.grpc import GrpcWire
from tests.client.conftest import Live
from tests.client.test_transports import f32


@pytest.fixture
def transport(url: str) -> Iterator[Client]:
    """Over each wire in turn."""
    t = connect(url, timeout=30)
    yield t
    t.close()


# -- errors -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_unreachable_server_is_a_connection_error_naming_the_url(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach the adamserve server at {url}") as e:
        ac.Adam([torch.zeros(3)], server=url)
    assert time.monotonic() - t0 < 5
    assert isinstance(e.value, ac.Unavailable) and e.value.url == url
    assert e.value.reason == "UNAVAILABLE"


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_values_the_wire_cannot_carry_are_refused_before_any_call(scheme: str) -> None:
    t = connect(f"{scheme}://127.0.0.1:{_free_port()}")  # nothing listens: no call is made
    specs = (TensorSpec("w", (3,)),)
    for spec, message in [
            (SessionSpec("s", "sgd", specs), "unknown algorithm 'sgd'"),
            (SessionSpec("s", "adam", specs, dtype="int8"), "dtype"),
            (SessionSpec("s", "adam", specs, workers=Workers(mode="sometimes")),
             "workers.mode"),
            (SessionSpec("s", "adam", specs, workers=Workers(straggler_policy="wait")),
             "workers.straggler_policy"),
            (SessionSpec("s", "adam", specs, schedule={"kind": "cyclic"}), "schedule.kind"),
            (SessionSpec("s", "adam", specs, schedule={"kind": "step", "gamma": 0.5,
                                                       "size": 3}), "schedule.size")]:
        with pytest.raises(errors.InvalidArgument, match=message) as e:
            t.create_session(spec)
        assert e.value.reason == "INVALID_ARGUMENT"
    t.close()


def test_bad_hyperparameter_is_a_value_error_with_the_servers_message(url: str) -> None:
    # the constructor checks as torch does, before any call to the server
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -1\.0$") as e:
        ac.Adam([torch.zeros(3)], lr=-1.0, server=url)
    assert not isinstance(e.value, ac.InvalidArgument)
    # what reaches the server is checked there too, and its message comes back
    opt = ac.Adam([torch.zeros(3)], server=url)
    try:
        with pytest.raises(ValueError, match=r"lr: expected a value >= 0, got -1\.0") as e:
            opt.transport.set_hyperparameters(opt.session_id, 0, {"lr": -1.0})
        assert isinstance(e.value, ac.InvalidArgument) and e.value.code == "invalid_argument"
        assert e.value.reason == "INVALID_ARGUMENT"
    finally:
        opt.close()
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        ac.RemoteOptimizer([torch.zeros(3)], "adam", server=url, momentum=0.9)
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        ac.RemoteOptimizer([torch.zeros(3)], "sgd", server=url)


def test_bad_requests_map_to_exceptions(transport: Client, sid: str) -> None:
    with pytest.raises(LookupError, match=f"'nope-{sid}'") as e:
        transport.describe(f"nope-{sid}")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ac.NotFound)
    assert e.value.reason == "SESSION_NOT_FOUND"
    assert e.value.metadata.get("session_id") == f"nope-{sid}"
    spec = SessionSpec(sid, "adam", (TensorSpec("w", (2,)),))
    transport.create_session(spec)
    try:
        with pytest.raises(ac.AlreadyExists) as exists:
            transport.create_session(spec)
        assert exists.value.reason == "SESSION_EXISTS"
        with pytest.raises(ValueError, match=r"tensor 'w': expected shape \[2\], got \[3\]"):
            transport.step(sid, [f32("w", np.zeros(3, np.float32))])
        with pytest.raises(ValueError, match="'v' is not in this session"):
            transport.step(sid, [f32("v", np.zeros(2, np.float32))])
        assert transport.describe(sid).step == 0
    finally:
        transport.delete_session(sid)


def test_reasons_of_a_stale_push_and_an_aborted_round(transport: Client, sid: str) -> None:
    specs = (TensorSpec("w", (2,)),)
    g = [f32("w", np.ones(2, np.float32))]
    transport.create_session(SessionSpec(sid, "adam", specs,
                                         workers=Workers(count=2, straggler_timeout=0.2)))
    try:
        assert transport.push(sid, g, sender=Sender("a", 1), base_step=0).pending
        with pytest.raises(errors.DeadlineExceeded) as waited:
            transport.pull(sid, min_step=1, wait=0.05)
        assert waited.value.reason == "WAIT_TIMEOUT"
        with pytest.raises(errors.Aborted) as aborted:
            transport.pull(sid, min_step=1, wait=10)
        assert aborted.value.reason == "ROUND_ABORTED"
        transport.set_workers(sid, 1)
        assert transport.step(sid, g, sender=Sender("a", 2), base_step=0).step == 1
        with pytest.raises(errors.FailedPrecondition) as stale:
            transport.push(sid, g, sender=Sender("b", 1), base_step=0)
        assert stale.value.reason == "STALE_PUSH"
        assert stale.value.metadata.get("session_id") == sid
    finally:
        transport.delete_session(sid)
    transport.create_session(SessionSpec(sid, "adam", specs,
                                         workers=Workers(mode="async", max_staleness=0)))
    try:
        transport.step(sid, g, base_step=0)
        with pytest.raises(errors.FailedPrecondition, match="stale") as stale:
            transport.step(sid, g, base_step=0)
        assert stale.value.reason == "STALE_PUSH" and transport.describe(sid).step == 1
    finally:
        transport.delete_session(sid)


@contextlib.contextmanager
def _serve(service: Any, token: str | None = None) -> Iterator[dict[str, str]]:
    """gRPC, HTTP and Flight in front of ``service``."""
    from adamserve.transports.flight import FlightServerThread
    from adamserve.transports.grpc import build_grpc_server
    from adamserve.transports.http import HttpServerThread, create_app

    server, port = build_grpc_server(service, port=0, token=token)
    http = HttpServerThread(create_app(service, token=token))
    http.start()
    flight = FlightServerThread(service, token=token)
    flight.start()
    try:
        yield {"grpc": f"grpc://127.0.0.1:{port}", "http": http.url, "flight": flight.url}
    finally:
        flight.stop()
        http.stop()
        server.stop(None)


@pytest.fixture(scope="module")
def bare_urls() -> Iterator[dict[str, str]]:
    """A server without a data directory and with 64 KiB for all sessions' state."""
    from adamserve.engine.kernels_cpu import CpuBackend
    from adamserve.service import OptimizerService
    from adamserve.sessions.store import Limits, SessionStore

    service = OptimizerService(SessionStore(CpuBackend(), None,
                                            Limits(max_state_bytes=64 << 10)))
    service.start()
    with _serve(service) as urls:
        yield urls


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_reasons_of_disabled_checkpoints_and_a_quota(bare_urls: dict[str, str], scheme: str,
                                                     sid: str) -> None:
    with connect(bare_urls[scheme]) as t:
        t.create_session(SessionSpec(sid, "adam", (TensorSpec("w", (2,)),)))
        try:
            with pytest.raises(errors.FailedPrecondition, match="data directory") as e:
                t.checkpoint(sid)
            assert e.value.reason == "CHECKPOINTS_DISABLED"
            with pytest.raises(errors.ResourceExhausted) as quota:
                t.create_session(SessionSpec(sid + "-big", "adam",
                                             (TensorSpec("w", (1 << 16,)),)))
            assert quota.value.reason == "QUOTA_EXCEEDED"
            assert not isinstance(quota.value, MemoryError)
        finally:
            t.delete_session(sid)


@pytest.fixture(scope="module")
def token_urls(live: Live) -> Iterator[dict[str, str]]:
    with _serve(live.service, token="s3cret") as urls:
        yield urls


@pytest.mark.parametrize("scheme", ["grpc", "http", "flight"])
def test_token(token_urls: dict[str, str], scheme: str) -> None:
    with pytest.raises(PermissionError, match="token") as e:
        connect(token_urls[scheme]).list_sessions()
    assert e.value.reason == "UNAUTHENTICATED"  # type: ignore[attr-defined]
    with pytest.raises(PermissionError):
        connect(token_urls[scheme], token="wrong").list_sessions()
    with ac.Adam([torch.zeros(2)], server=token_urls[scheme], token="s3cret") as opt:
        assert opt.describe().step == 0


# -- retries ----------------------------------------------------------------------------


class _Unavailable:
    """Makes a wire's next ``count`` requests fail as a server that is not up yet does."""

    def __init__(self, t: Client, count: int) -> None:
        self.left, self.attempts = count, 0
        w = t.wire
        if isinstance(w, GrpcWire):
            import grpc

            class Refused(grpc.RpcError):
                def code(self) -> grpc.StatusCode:
                    return grpc.StatusCode.UNAVAILABLE

                def details(self) -> str:
                    return "failed to connect to all addresses; Connection refused"

            stub = w._stubs["GetSession"]
            w._stubs["GetSession"] = lambda *a, **k: self._maybe(Refused(), stub, a, k)
        elif isinstance(w, FlightWire):
            import pyarrow.flight as fl

            real, outer = w._client, self

            class Flaky:  # the FlightClient, whose actions fail as a refused connection does
                def do_action(self, *a: Any, **k: Any) -> Any:
                    return outer._maybe(fl.FlightUnavailableError(
                        "failed to connect to all addresses; Connection refused"),
                        real.do_action, a, k)

                def close(self) -> None:
                    real.close()

            w._client = Flaky()  # type: ignore[assignment]
        else:
            import httpx

            request = w._client.request
            w._client.request = (  # type: ignore[method-assign]
                lambda *a, **k: self._maybe(httpx.ConnectError("refused"), request, a, k))

    def _maybe(self, exc: Exception, real: Any, args: Any, kwargs: Any) -> Any:
        self.attempts += 1
        if self.left > 0:
            self.left -= 1
            raise exc
        return real(*args, **kwargs)


def test_a_call_is_retried_after_unavailable(url: str, sid: str) -> None:
    with connect(url, retries=3) as t:
        t.create_session(SessionSpec(sid, "adam", (TensorSpec("w", (2,)),)))
        try:
            flaky = _Unavailable(t, 2)
            assert t.describe(sid).session_id == sid  # the third attempt reaches it
            assert flaky.attempts == 3
            _Unavailable(t, 3)
            with pytest.raises(errors.Unavailable, match="3 attempts") as e:
                t.describe(sid)
            assert e.value.reason == "UNAVAILABLE"
        finally:
            t.delete_session(sid)


def test_steps_are_retried_only_when_they_never_reached_a_server() -> None:
    """An UNAVAILABLE in the middle of a step may follow an applied step: retrying it
    could apply it twice. Only a connection that was never made is retried."""
    import grpc

    from adamserve_client.transports._status import Details
    from adamserve_client.transports.grpc import _never_sent, _unavailable, error_details

    class Err(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._details

    refused = Err(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last "
                  "error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused")
    midway = Err(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert _never_sent(refused) and _unavailable(refused)
    assert not _never_sent(midway) and _unavailable(midway)
    assert not _never_sent(Err(grpc.StatusCode.INVALID_ARGUMENT, "failed to connect"))
    assert error_details(midway) == Details()  # no status details: the class's reason


def test_http_retries_a_503_only_for_calls_that_may_run_twice() -> None:
    """A 503 may come from a proxy after the server took the request: a create (not
    safe to repeat) is sent once, a describe up to ``retries`` times."""
    import http.server
    import threading

    hits: list[str] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def _busy(self) -> None:
            hits.append(self.command)
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = b'{"error": "upstream failed", "code": "unavailable"}'
            self.send_response(503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _busy

        def log_message(self, *args: Any) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with connect(f"http://127.0.0.1:{proxy.server_address[1]}", retries=3) as t:
            with pytest.raises(errors.Unavailable):
                t.create_session(SessionSpec("s", "adam", (TensorSpec("w", (2,)),)))
            assert hits == ["POST"]
            with pytest.raises(errors.Unavailable):
                t.describe("s")
            assert hits == ["POST", "GET", "GET", "GET"]
    finally:
        proxy.shutdown()
        proxy.server_close()
