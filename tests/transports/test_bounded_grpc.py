"""Threads stay bounded over gRPC and Flight: the red-team attacks, scaled down.

The pass found that 1,100 idle, unauthenticated server-reflection streams took every
thread of the gRPC pool (1,024), and that a key holder did the same with Push streams
that never half-close. Here the pool is 96 threads and tenant ``a`` may hold 8 calls
at once, so ~100 streams make the same attack: each is refused at once past its
bound (UNAUTHENTICATED; TOO_MANY_STREAMS with a retry hint), and tenant ``b``'s small
steps stay under :data:`P99` seconds meanwhile. Measured numbers are in
docs/security.md ("Bounded resources").
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pyarrow.flight as fl
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import Access, OptimizerService
from adamserve.service.access import OPEN_MAX_STREAMS, hash_key
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.flight import FlightServerThread
from adamserve.transports.grpc import build_grpc_server
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

from .test_flight import _batch

KEYS = {t: secrets.token_urlsafe(32) for t in ("a", "b")}
POOL = 96  # the gRPC server's threads (1,024 in `adamserve serve`)
MAX_STREAMS = 8  # tenant a's calls in flight (256 by default)
P99 = 0.2  # seconds: tenant b's small steps during every attack


@dataclass
class Live:
    service: OptimizerService
    access: Access
    grpc_port: int
    flight_url: str

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    def in_flight(self, tenant: str | None) -> int:
        caller = None if tenant is None else self.access.authenticate(f"Bearer {KEYS[tenant]}")
        return self.access.in_flight(caller)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    access = Access.from_mapping({
        "tenants": {"a": {"max_streams": MAX_STREAMS}},
        "keys": [{"name": t, "tenant": t, "role": "read-write", "sha256": hash_key(k)}
                 for t, k in KEYS.items()]})
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(max_state_bytes=1 << 30),
                                            access.tenant_limits()))
    service.start()
    server, port = build_grpc_server(service, max_workers=POOL, access=access)
    flight = FlightServerThread(service, access=access)
    flight.start()
    live = Live(service, access, port, flight.url)
    for tenant in KEYS:
        with connect(f"grpc://127.0.0.1:{port}", token=KEYS[tenant]) as c:
            c.create_session(SessionSpec("s", "adam", (TensorSpec("w", (4,)),)))
            c.step("s", GRAD)  # warm: the kernels compiled before anything is timed
    yield live
    flight.stop()
    server.stop(None)


GRAD = [WireTensor("w", (4,), "FP32", np.ones(4, np.float32).tobytes())]


class Steps:
    """Tenant b's small steps over ``url``, one after the other, while an attack runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with connect(self.url, token=KEYS["b"], retries=1) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.step("s", GRAD)
                except Exception as exc:  # recorded: the check fails on it
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.005)

    def __enter__(self) -> Steps:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        end = time.monotonic() + 10  # a short attack: a few more steps, as it ends
        while len(self.latencies) < 20 and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(30)

    def check(self) -> None:
        assert not self.failures, self.failures[:3]
        p99 = float(np.percentile(self.latencies, 99))
        assert p99 < P99, f"tenant b's steps: p99 {p99 * 1000:.0f} ms during the attack"


def _until(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def _retry_after(err: grpc.RpcError) -> tuple[str, float]:
    """The refusal's reason and its RetryInfo delay, in seconds."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no status details"
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    found = {d.type_url.rsplit(".", 1)[1] for d in status.details}
    assert {"ErrorInfo", "RetryInfo"} <= found, found
    for d in status.details:
        d.Unpack(info) if d.Is(info.DESCRIPTOR) else d.Unpack(retry)
    return info.reason, retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9


def _never_ending(first: Any, release: threading.Event) -> Iterator[Any]:
    """A request stream of one message that never half-closes (until ``release``)."""
    yield first
    release.wait(60)


# -- gRPC --------------------------------------------------------------------------------


def test_unauthenticated_reflection_streams_are_refused_at_once(live: Live) -> None:
    """100 idle reflection streams without a key: each refused at once, holding no
    thread (before the fix they held the pool and every keyed call timed out)."""
    release = threading.Event()
    channel = live.channel()
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    idle = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        with Steps(f"grpc://127.0.0.1:{live.grpc_port}") as steps:
            t0 = time.monotonic()
            calls = [stub.ServerReflectionInfo(_never_ending(idle, release))
                     for _ in range(100)]
            codes = []
            for call in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    next(call)
                codes.append(refused.value.code())
            took = time.monotonic() - t0
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        assert took < 10, f"100 refusals took {took:.1f} s"
        assert live.in_flight(None) == 0
        steps.check()
    finally:
        release.set()
        channel.close()


def test_health_watches_past_the_open_cap_are_refused(live: Live) -> None:
    """The health service needs no key: its calls in flight are capped together (64);
    past that a Watch is refused (TOO_MANY_STREAMS, RetryInfo), and keyed calls are not
    held up by the 64 held open."""
    channel = live.channel()
    stub = health_pb2_grpc.HealthStub(channel)
    extra = 6
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""))
               for _ in range(OPEN_MAX_STREAMS + extra)]
    try:
        with Steps(f"grpc://127.0.0.1:{live.grpc_port}") as steps:
            served, refused = 0, []
            for w in watches:
                try:
                    assert next(w).status == health_pb2.HealthCheckResponse.SERVING
                    served += 1
                except grpc.RpcError as err:
                    refused.append(err)
            assert live.in_flight(None) == OPEN_MAX_STREAMS
        assert served == OPEN_MAX_STREAMS and len(refused) == extra
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            reason, delay = _retry_after(err)
            assert reason == "TOO_MANY_STREAMS" and delay > 0
        steps.check()
    finally:
        for w in watches:
            w.cancel()
        channel.close()
    _until("the watches to end", lambda: live.in_flight(None) == 0)


def test_one_tenants_never_ending_pushes_leave_another_tenant_served(live: Live) -> None:
    """Tenant a opens 3x its quota of Push streams that never half-close: those past it
    are refused at once (RESOURCE_EXHAUSTED, TOO_MANY_STREAMS, RetryInfo); tenant b's
    steps stay quick while a's hold their threads."""
    release = threading.Event()
    channel = live.channel()
    stub = pb_grpc.OptimizerServiceStub(channel)
    metadata = (("authorization", f"Bearer {KEYS['a']}"),)
    first = pb.PushRequest(header=pb.StepHeader(session_id="s"))
    pushes = []
    try:
        with Steps(f"grpc://127.0.0.1:{live.grpc_port}") as steps:
            for _ in range(3 * MAX_STREAMS):
                pushes.append(stub.Push.future(_never_ending(first, release),
                                               metadata=metadata))
            _until("tenant a's refusals", lambda: sum(p.done() for p in pushes)
                   == 2 * MAX_STREAMS)
            assert live.in_flight("a") == MAX_STREAMS
            time.sleep(1.0)  # b steps on while a's streams stay open
        refused = [p for p in pushes if p.done()]
        for p in refused:
            err = p.exception()
            assert isinstance(err, grpc.RpcError)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            reason, delay = _retry_after(err)
            assert reason == "TOO_MANY_STREAMS" and delay > 0
        steps.check()
    finally:
        for p in pushes:
            p.cancel()
        release.set()
        channel.close()
    _until("tenant a's calls to end", lambda: live.in_flight("a") == 0)


# -- Flight ------------------------------------------------------------------------------


def _flight_status(exc: fl.FlightError) -> str:
    status = status_pb2.Status.FromString(exc.extra_info)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


def test_one_tenants_never_ending_flight_puts_leave_another_tenant_served(live: Live) -> None:
    """The same over Flight: DoPut pushes that never finish. Past tenant a's quota each
    is refused at once (TOO_MANY_STREAMS, told when the put is closed); tenant b's Flight
    steps stay quick while a's hold theirs open."""
    client = fl.connect(live.flight_url.replace("flight://", "grpc://"))
    options = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {KEYS['a']}".encode())])
    command = pb.FlightCommand(push=pb.PushRequest(header=pb.StepHeader(session_id="s")))
    descriptor = fl.FlightDescriptor.for_command(command.SerializeToString())
    batch = _batch("w", (4,), np.ones(2))  # half of the tensor: the push never completes
    writers: list[Any] = []
    reasons: list[str] = []
    try:
        with Steps(live.flight_url) as steps:
            for _ in range(3 * MAX_STREAMS):
                writer, _ = client.do_put(descriptor, batch.schema, options=options)
                try:
                    writer.write_batch(batch)
                except fl.FlightError as exc:  # refused before the batch went out
                    reasons.append(_flight_status(exc))
                    with contextlib.suppress(fl.FlightError):
                        writer.close()
                    continue
                writers.append(writer)
            _until("tenant a's puts to fill its quota",
                   lambda: live.in_flight("a") == MAX_STREAMS)
            time.sleep(1.0)  # b steps on while a's puts stay open
            assert live.in_flight("a") == MAX_STREAMS
        steps.check()
    finally:
        # all end at once (the one reading holds the session's intake: the others wait
        # for it); the refused ones say why, the others that half a tensor came
        for writer in writers:
            with contextlib.suppress(fl.FlightError):
                writer.done_writing()
        for writer in writers:
            try:
                writer.close()
            except fl.FlightError as exc:
                reasons.append(_flight_status(exc))
        client.close()
    assert sorted(reasons) == ["INVALID_ARGUMENT"] * MAX_STREAMS + [
        "TOO_MANY_STREAMS"] * (2 * MAX_STREAMS), reasons
    _until("tenant a's puts to end", lambda: live.in_flight("a") == 0)
