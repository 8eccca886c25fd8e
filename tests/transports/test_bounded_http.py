"""HTTP bodies and connections stay bounded: the red-team attacks, bounded, on 127.0.0.1.

A real uvicorn server in this process (so its RSS is /proc/self's), two tenants with
their keys, raw sockets for the attacks (half a header line, bodies that never end)
and httpx for the tenant whose small steps must stay quick meanwhile. Measured
numbers are in docs/security.md ("Bounded resources").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import Access, OptimizerService
from adamserve.service.access import hash_key
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.http import HttpServerThread, create_app
from adamserve.transports.http.body import JSON_EXPANSION, BodyBudget
from adamserve.transports.http.connections import MAX_HEADER_BYTES
from adamserve.transports.http.routes import BODY_ROUTES
from tests.transports.test_http_lean import Answer, _head, _read_answer

MiB = 1 << 20
KEYS = {t: secrets.token_urlsafe(32) for t in ("a", "a_reader", "b")}
MAX_STREAMS = 8  # tenant a's calls in flight
BUDGET = 64 * MiB  # bytes of bodies held at once
HEADER_TIMEOUT = 1.0
KEEPALIVE = 1.0
BODY_TIMEOUT = 4.0  # longer than a body waits for room in the budget (2 s)
P99 = 0.2  # seconds: tenant b's small steps during every attack


@dataclass
class Live:
    port: int
    url: str
    service: OptimizerService
    access: Access
    budget: BodyBudget


def _auth() -> dict[str, object]:
    return {"tenants": {"a": {"max_streams": MAX_STREAMS}},
            "keys": [{"name": name, "tenant": name[0], "sha256": hash_key(key),
                      "role": "read-only" if name == "a_reader" else "read-write"}
                     for name, key in KEYS.items()]}


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    access = Access.from_mapping(_auth())
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(max_state_bytes=1 << 30),
                                            access.tenant_limits()))
    service.start()
    app = create_app(service, access=access, max_buffered_bytes=BUDGET,
                     body_idle_timeout=BODY_TIMEOUT)
    with HttpServerThread(app, header_timeout=HEADER_TIMEOUT,
                          keepalive_timeout=KEEPALIVE) as http:
        live = Live(http.port, http.url, service, access, app.state.body_budget)
        for tenant in ("a", "b"):
            with _client(live, tenant) as c:
                r = c.post("/v2/sessions", json={
                    "session_id": "s", "algorithm": "ALGORITHM_ADAM",
                    "tensors": [{"name": "w", "shape": [4]}]})
                assert r.status_code == 201, r.text
                # warm: the kernels compiled before any RSS is measured
                assert c.post("/v2/sessions/s/step", json=STEP).status_code == 200
        yield live


def _client(live: Live, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=live.url, timeout=30,
                        headers={"authorization": f"Bearer {KEYS[tenant]}"})


def _auth_header(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


STEP = {"gradients": [{"name": "w", "shape": [4], "datatype": "FP32", "data": [0.5] * 4}]}


class Steps:
    """Tenant b's small steps, one after the other, while an attack runs: their latencies."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with _client(self.live, "b") as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                r = c.post("/v2/sessions/s/step", json=STEP)
                self.latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text}")
                time.sleep(0.005)

    def __enter__(self) -> Steps:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        end = time.monotonic() + 10  # a short attack: a few more steps, as it ends
        while len(self.latencies) < 10 and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(30)

    def check(self) -> None:
        assert not self.failures, self.failures[:3]
        assert len(self.latencies) >= 10, self.latencies
        p99 = float(np.percentile(self.latencies, 99))
        assert p99 < P99, f"tenant b's steps: p99 {p99 * 1000:.0f} ms during the attack"


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Freed heap pages handed back, VmHWM started again: the RSS now."""
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # glibc's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()


def _connect(live: Live) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; how long that took and what came."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return time.monotonic() - t0, got


def _numbers_body(nbytes: int) -> bytes:
    """A JSON step of about ``nbytes`` whose numbers are short ("0.5,": the parse is big)."""
    n = nbytes // 4
    return (b'{"gradients": [{"name": "w", "shape": [%d], "datatype": "FP32", "data": ['
            % n + b"0.5," * (n - 1) + b"0.5]}]}")


# -- bodies for sessions the caller does not have ----------------------------------------


def test_a_body_for_a_missing_session_is_answered_404_unread(live: Live) -> None:
    """A 32 MiB JSON body (and two 64 MiB binary ones) for a session that does not exist:
    404 from the headers, the body never read, tenant b's steps unaffected. (Before the
    fix the JSON body was read and parsed first: +600 MiB RSS, b's steps stalled.)"""
    body = _numbers_body(32 * MiB)
    zeros = bytes(MiB)
    answers: list[Answer] = []

    def json_attack() -> None:
        with _connect(live) as sock:
            sock.sendall(_head("/v2/sessions/nope/step", {
                **_auth_header("a"), "content-type": "application/json",
                "content-length": str(len(body))}))
            sock.sendall(body)  # not joined to the head: no copy of it here
            answers.append(_read_answer(sock))

    def binary_attack(path: str, method: str) -> None:
        head = json.dumps({"gradients": [{"name": "w", "shape": [16 * MiB], "datatype": "FP32",
                                          "parameters": {"binary_data_size": 64 * MiB}}]}
                          ).encode()
        with _connect(live) as sock:
            headers = {**_auth_header("a"), "content-type": "application/octet-stream",
                       "content-length": str(len(head) + 64 * MiB)}
            if path.endswith("step"):
                headers["adamserve-header-length"] = str(len(head))
            else:
                head = b""
                headers["content-length"] = str(64 * MiB)
            sock.sendall(_head(path, headers, method) + head)
            for _ in range(64):
                sock.sendall(zeros)
            answers.append(_read_answer(sock))

    base = _reset_peak()
    with Steps(live) as steps:
        attacks = [threading.Thread(target=json_attack),
                   threading.Thread(target=binary_attack, args=("/v2/sessions/nope/step",
                                                                "POST")),
                   threading.Thread(target=binary_attack, args=("/v2/sessions/nope/state",
                                                                "PUT"))]
        for t in attacks:
            t.start()
        for t in attacks:
            t.join(60)
    grown = _rss("VmHWM") - base
    assert [a.status for a in answers] == [404, 404, 404], [a.body for a in answers]
    assert all(a.json()["reason"] == "SESSION_NOT_FOUND" for a in answers)
    assert grown < 24 * MiB, f"the server's RSS grew by {grown / MiB:.0f} MiB"
    steps.check()


def test_a_read_only_key_or_another_tenants_session_is_refused_before_the_body(
        live: Live) -> None:
    """403 for a read-only key's change, 404 for another tenant's session (as for one that
    never was): from the headers, the 64 MiB bodies they announce never sent."""
    with _client(live, "a") as c:
        r = c.post("/v2/sessions", json={"session_id": "a-only", "algorithm": "ALGORITHM_ADAM",
                                         "tensors": [{"name": "w", "shape": [4]}]})
        assert r.status_code == 201, r.text
    for tenant, path, status in (("a_reader", "/v2/sessions/a-only/push", 403),
                                 ("b", "/v2/sessions/a-only/commit", 404),
                                 ("b", "/v2/sessions/a-only/step", 404)):
        with _connect(live) as sock:
            sock.sendall(_head(path, {**_auth_header(tenant), "content-type": "application/json",
                                      "content-length": str(64 * MiB)}))
            t0 = time.monotonic()
            answer = _read_answer(sock)
        assert answer.status == status, (tenant, path, answer.body)
        assert time.monotonic() - t0 < 1.0


def test_every_route_with_a_body_is_checked_before_its_body(live: Live) -> None:
    from fastapi.routing import APIRoute

    from adamserve.transports.http.routes import router
    reading = {r.name for r in router.routes if isinstance(r, APIRoute) and (
        r.body_field is not None or "requestBody" in (r.openapi_extra or {}))}
    assert reading == set(BODY_ROUTES)


# -- many big bodies at once ---------------------------------------------------------------


def test_bodies_held_at_once_stay_within_the_budget(live: Live) -> None:
    """Three JSON bodies that each hold a third of the budget (once parsed: 16x their
    bytes) stop one byte short of their end: the third waits, then is refused 429 with
    Retry-After; the first two, finished, are served; then the budget is free again."""
    size = BUDGET // JSON_EXPANSION // 2 - 4096  # two fit, not three
    body = _numbers_body(size)
    socks = [_connect(live) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(_head("/v2/sessions/s/step", {
                **_auth_header("a"), "content-type": "application/json",
                "content-length": str(len(body))}))
            sock.sendall(memoryview(body)[:-1])
            time.sleep(0.2)  # in this order
        t0 = time.monotonic()
        refused = _read_answer(socks[2])
        waited = time.monotonic() - t0
        assert refused.status == 429, refused.body
        assert refused.json()["reason"] == "QUOTA_EXCEEDED"
        assert "limit is 67108864" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        assert 1.0 < waited < 4.0  # it waited for room (2 s), then gave up
        assert live.budget.used <= BUDGET
        for sock in socks[:2]:
            sock.sendall(body[-1:])
            answer = _read_answer(sock)
            # the body is a step of the wrong shape: read and refused by the service
            assert answer.status == 400, answer.body
            assert "expected shape [4]" in answer.json()["error"]
    finally:
        for sock in socks:
            sock.close()
    _until("the budget to be free", lambda: live.budget.used == 0)


def test_big_bodies_waiting_for_room_are_not_read(live: Live) -> None:
    """Six 8 MiB JSON bodies at once, each needing the whole budget (128 MiB parsed, so
    all of it): one is read, the others wait unread (their bytes stay in the sockets),
    then are refused 429; the server's RSS grows by about one body, not six."""
    body = _numbers_body(8 * MiB)
    answers: dict[int, Answer] = {}
    socks = [_connect(live) for _ in range(6)]

    def send(i: int, upto: int) -> None:
        sock = socks[i]
        sock.sendall(_head("/v2/sessions/s/step", {
            **_auth_header("a"), "content-type": "application/json",
            "content-length": str(len(body))}))
        with contextlib.suppress(OSError):  # refused, and closed, before all was sent
            sock.sendall(memoryview(body)[:upto])
        answers[i] = _read_answer(sock)

    base = _reset_peak()
    try:
        first = threading.Thread(target=send, args=(0, len(body) - 1))
        first.start()
        _until("the first body to take the budget", lambda: live.budget.used == BUDGET)
        rest = [threading.Thread(target=send, args=(i, len(body))) for i in range(1, 6)]
        for t in rest:
            t.start()
        for t in rest:
            t.join(30)
        grown = _rss("VmHWM") - base
        assert sorted(answers) == [1, 2, 3, 4, 5]
        assert all(a.status == 429 and a.json()["reason"] == "QUOTA_EXCEEDED"
                   for a in answers.values()), [a.body for a in answers.values()]
        assert grown < 2 * len(body) + 16 * MiB, (
            f"the server's RSS grew by {grown / MiB:.0f} MiB while one body was read")
        socks[0].sendall(body[-1:])
        first.join(30)
        assert answers[0].status == 400 and "expected shape [4]" in answers[0].json()["error"]
    finally:
        for sock in socks:
            sock.close()
    _until("the budget to be free", lambda: live.budget.used == 0)


# -- connections -------------------------------------------------------------------------


def test_half_a_header_line_is_closed_within_the_header_timeout(live: Live) -> None:
    with _connect(live) as sock:
        sock.sendall(b"POST /v2/sessions/s/step HTTP/1.1\r\nhost: te")
        took, got = _closed_within(sock, 10)
    assert got.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT + 1.0


def test_headers_a_byte_at_a_time_get_no_more_time(live: Live) -> None:
    """The deadline runs from the request's first byte: more bytes do not move it."""
    line = b"GET /healthz HTTP/1.1\r\nhost: test\r\nx-slow: " + b"a" * 100
    with _connect(live) as sock:
        t0 = time.monotonic()
        for byte in line:
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.05)[0]:  # the server answered: stop
                break
        _, got = _closed_within(sock, 10)
    assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < HEADER_TIMEOUT + 1.0


def test_a_connection_that_sends_nothing_is_closed(live: Live) -> None:
    with _connect(live) as sock:
        took, got = _closed_within(sock, 10)
    assert got == b"" and took < HEADER_TIMEOUT + 1.0


def test_an_idle_keep_alive_connection_is_closed(live: Live) -> None:
    with _connect(live) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        assert _read_answer(sock).status == 200
        took, got = _closed_within(sock, 10)
    assert got == b"" and took < KEEPALIVE + 1.0


def test_headers_past_the_limit_are_refused(live: Live) -> None:
    with _connect(live) as sock:  # all of it fits the socket's buffers: sent before the answer
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: "
                     + b"a" * (MAX_HEADER_BYTES + 1024))
        _, got = _closed_within(sock, 10)
    assert got.startswith(b"HTTP/1.1 431")


# -- bodies that never end ---------------------------------------------------------------


def test_one_tenants_never_ending_bodies_leave_another_tenant_served(live: Live) -> None:
    """Tenant a opens 3x its calls in flight, each sending a step body that never ends:
    past its quota each is refused at once (429, TOO_MANY_STREAMS, Retry-After); those
    admitted are refused when the body stalls (400). Tenant b's steps stay quick."""
    body = json.dumps(STEP).encode()
    socks = [_connect(live) for _ in range(3 * MAX_STREAMS)]
    try:
        with Steps(live) as steps:
            for sock in socks:
                sock.sendall(_head("/v2/sessions/s/step", {
                    **_auth_header("a"), "content-type": "application/json",
                    "content-length": str(len(body))}) + body[:10])
            _until("tenant a's calls to fill its quota", lambda: live.access.in_flight(
                live.access.authenticate(f"Bearer {KEYS['a']}")) == MAX_STREAMS)
            answers = [_read_answer(sock) for sock in socks]
        steps.check()
    finally:
        for sock in socks:
            sock.close()
    codes = sorted(a.status for a in answers)
    assert codes == [400] * MAX_STREAMS + [429] * (2 * MAX_STREAMS), codes
    for a in answers:
        if a.status == 429:
            assert a.json()["reason"] == "TOO_MANY_STREAMS" and "retry-after" in a.headers
        else:
            assert a.json()["error"].startswith("the request body stalled: nothing arrived "
                                                f"for {BODY_TIMEOUT:g} s")
    _until("tenant a's calls to end", lambda: live.access.in_flight(
        live.access.authenticate(f"Bearer {KEYS['a']}")) == 0)


def _until(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)
