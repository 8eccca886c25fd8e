"""The lean HTTP bulk path against a real server on 127.0.0.1: binary bodies are read
as the service decodes them, after the session is looked up, never whole.

Bodies go over a plain socket here, cut where we choose (mid-element, between
tensors) or with no Content-Length at all, so every way a body can arrive is seen;
the numbers are checked against torch.optim.Adam. A body the server refuses from
its headers and JSON part is refused before its tensor bytes are sent; one that is
cut short, too long, or lies about its sizes is refused with 400 and changes
nothing.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.http import HttpServerThread, create_app
from adamserve.transports.http.binary import PIECE
from adamserve_proto import codec

OCTET = "application/octet-stream"
MAX_JSON = 1 << 16


@dataclass
class Live:
    url: str
    port: int
    service: OptimizerService
    store: SessionStore


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    store = SessionStore(CpuBackend(), CheckpointStore(tmp_path_factory.mktemp("lean")),
                         Limits(max_state_bytes=1 << 30))
    service = OptimizerService(store)
    service.start()
    with HttpServerThread(create_app(service, max_json_bytes=MAX_JSON)) as server:
        yield Live(server.url, server.port, service, store)


@pytest.fixture
def client(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


# -- a plain-socket HTTP client ------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _read_answer(sock: socket.socket) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += got
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        got = sock.recv(n - len(body))
        if not got:
            raise ConnectionError("closed in the middle of an answer")
        body += got
    return Answer(int(lines[0].split()[1]), headers, body)


def _head(path: str, headers: dict[str, str], method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: test\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


def send(port: int, path: str, segments: Sequence[bytes], headers: dict[str, str],
         pause: float = 0.0) -> Answer:
    """POST ``segments`` one by one (``pause`` seconds apart, so that the server sees
    them apart), then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_head(path, headers))
        for seg in segments:
            sock.sendall(seg)
            if pause:
                time.sleep(pause)
        return _read_answer(sock)


def send_chunked(port: int, path: str, segments: Sequence[bytes], headers: dict[str, str],
                 method: str = "POST") -> Answer:
    """Send ``segments`` as the chunks of a chunked body (no Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(_head(path, {**headers, "transfer-encoding": "chunked"}, method))
        for seg in segments:
            sock.sendall(b"%x\r\n" % len(seg) + seg + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        return _read_answer(sock)


def send_head_only(port: int, path: str, json_part: bytes, headers: dict[str, str],
                   declared: int) -> Answer:
    """Send the headers (Content-Length ``declared``) and the JSON part only: the answer
    must come without the tensor bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_head(path, {**headers, "content-length": str(declared)}) + json_part)
        return _read_answer(sock)


# -- sessions and references ------------------------------------------------------------

# Sizes that put tensors at odd offsets: BF16 and FP16 with odd counts, so the FP64 and
# FP32 tensors after them start in the middle of an 8- or 4-byte word; "big" spans
# several pieces.
TENSORS: list[tuple[str, tuple[int, ...], str]] = [
    ("odd16", (1001,), "BF16"), ("half", (3, 111), "FP16"), ("wide", (250_001,), "FP64"),
    ("big", (3 * PIECE // 4 + 777,), "FP32"), ("empty", (0,), "FP32"), ("tail", (5,), "BF16")]


def _create(c: httpx.Client, sid: str, tensors: Sequence[tuple[str, tuple[int, ...], str]],
            **extra: Any) -> None:
    r = c.post("/v2/sessions", json={
        "session_id": sid, "algorithm": "ALGORITHM_ADAM", "dtype": "STATE_DTYPE_FLOAT64",
        "groups": [{"values": {"lr": 0.01}}],
        "tensors": [{"name": n, "shape": list(s)} for n, s, _ in tensors], **extra})
    assert r.status_code == 201, r.text


def _gradients(seed: int, tensors: Sequence[tuple[str, tuple[int, ...], str]]
               ) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {n: bytes(codec.encode(rng.standard_normal(s), dt)) for n, s, dt in tensors}


def _body(grads: dict[str, bytes], tensors: Sequence[tuple[str, tuple[int, ...], str]],
          **fields: Any) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a step."""
    entries = [{"name": n, "shape": list(s), "datatype": dt,
                "parameters": {"binary_data_size": len(grads[n])}} for n, s, dt in tensors]
    head = json.dumps({"gradients": entries, **fields}).encode()
    return head, b"".join(grads[n] for n, _, _ in tensors)


def _binary_headers(head: bytes, total: int | None = None) -> dict[str, str]:
    h = {"content-type": OCTET, "adamserve-header-length": str(len(head))}
    if total is not None:
        h["content-length"] = str(total)
    return h


class TorchAdam:
    """torch.optim.Adam (float64) on the same tensors, fed the wire's gradients."""

    def __init__(self, tensors: Sequence[tuple[str, tuple[int, ...], str]]) -> None:
        self.tensors = tensors
        self.params = {n: torch.zeros(s, dtype=torch.float64, requires_grad=True)
                       for n, s, _ in tensors}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=0.01)

    def step(self, grads: dict[str, bytes]) -> None:
        for n, s, dt in self.tensors:
            values = codec.decode(grads[n], dt).astype(np.float64).reshape(s)
            self.params[n].grad = torch.from_numpy(values)
        self.opt.step()

    def flat(self, name: str) -> np.ndarray[Any, Any]:
        return self.params[name].detach().numpy().ravel()


def _params(answer: Answer) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    assert answer.status == 200, answer.body[:500]
    n = int(answer.headers["adamserve-header-length"])
    head = json.loads(answer.body[:n])
    out = {}
    pos = n
    for t in head["params"]:
        size = t["parameters"]["binary_data_size"]
        out[t["name"]] = codec.decode(answer.body[pos:pos + size], t["datatype"])
        pos += size
    assert pos == len(answer.body)
    return head, out


def _cuts(head: bytes, payload: bytes) -> list[bytes]:
    """The body cut mid-element, mid-tensor and at the JSON part's end."""
    body = head + payload
    marks = sorted({len(head) - 3, len(head), len(head) + 1, len(head) + 1001,
                    len(head) + 2002 + 3, len(head) + 2002 + 666 + 5,
                    len(head) + 2002 + 666 + 8 * 1000 + 3, len(body) - 7, len(body) - 1})
    return [body[a:b] for a, b in zip([0, *marks], [*marks, len(body)], strict=True)]


# -- the happy paths ------------------------------------------------------------------


def test_steps_cut_anywhere_match_torch(client: httpx.Client, live: Live) -> None:
    _create(client, "cuts", TENSORS)
    ref = TorchAdam(TENSORS)
    for seed in range(3):
        grads = _gradients(seed, TENSORS)
        head, payload = _body(grads, TENSORS, binary_output=True, return_datatype="FP64")
        answer = send(live.port, "/v2/sessions/cuts/step", _cuts(head, payload),
                      _binary_headers(head, len(head) + len(payload)), pause=0.002)
        ref.step(grads)
        status, params = _params(answer)
        assert status["step"] == seed + 1 and not status["skipped"]
        for n, _, _ in TENSORS:
            np.testing.assert_allclose(params[n], ref.flat(n), rtol=1e-12, atol=1e-15)


def test_chunked_bodies_match_torch(client: httpx.Client, live: Live) -> None:
    _create(client, "chunked", TENSORS)
    ref = TorchAdam(TENSORS)
    grads = _gradients(7, TENSORS)
    head, payload = _body(grads, TENSORS, binary_output=True, return_datatype="FP64")
    answer = send_chunked(live.port, "/v2/sessions/chunked/step", _cuts(head, payload),
                          _binary_headers(head))
    ref.step(grads)
    _, params = _params(answer)
    for n, _, _ in TENSORS:
        np.testing.assert_allclose(params[n], ref.flat(n), rtol=1e-12, atol=1e-15)


def test_binary_create_add_tensors_and_set_parameters_stream(client: httpx.Client,
                                                             live: Live) -> None:
    """Initial values and SetParameters arrive by the same path as gradients."""
    big = [("a", (PIECE // 2 + 3,), "FP32"), ("b", (7,), "BF16")]
    rng = np.random.default_rng(3)
    init = {n: rng.standard_normal(s) for n, s, _ in big}
    wire = {n: bytes(codec.encode(init[n], dt)) for n, _, dt in big}
    entries = [{"name": n, "shape": list(s), "datatype": dt,
                "parameters": {"binary_data_size": len(wire[n])}} for n, s, dt in big]
    head = json.dumps({"session_id": "init", "algorithm": "ALGORITHM_ADAM",
                       "dtype": "STATE_DTYPE_FLOAT64",
                       "tensors": [{"name": n, "shape": list(s)} for n, s, _ in big],
                       "initial": entries}).encode()
    payload = wire["a"] + wire["b"]
    answer = send(live.port, "/v2/sessions", _cuts(head, payload),
                  _binary_headers(head, len(head) + len(payload)), pause=0.002)
    assert answer.status == 201, answer.body
    pulled = client.post("/v2/sessions/init/pull", json={"datatype": "FP64"}).json()["params"]
    for t, (n, _, dt) in zip(pulled, big, strict=True):
        np.testing.assert_array_equal(t["data"], codec.decode(wire[n], dt).astype(np.float64))
    # add a tensor with binary initial values, then overwrite one by SetParameters
    extra = bytes(codec.encode(np.arange(9.0), "FP16"))
    head = json.dumps({"tensors": [{"name": "c", "shape": [9]}], "initial": [
        {"name": "c", "shape": [9], "datatype": "FP16",
         "parameters": {"binary_data_size": len(extra)}}]}).encode()
    r = client.post("/v2/sessions/init/tensors", content=head + extra,
                    headers=_binary_headers(head))
    assert r.status_code == 200, r.text
    values = bytes(codec.encode(-np.arange(PIECE // 2 + 3.0), "FP64"))
    head = json.dumps({"values": [{"name": "a", "shape": [PIECE // 2 + 3], "datatype": "FP64",
                                   "parameters": {"binary_data_size": len(values)}}]}).encode()
    answer = send_chunked(live.port, "/v2/sessions/init/params", [head, values[:5], values[5:]],
                          _binary_headers(head), method="PUT")
    assert answer.status == 200, answer.body
    got = {t["name"]: t["data"] for t in client.post(
        "/v2/sessions/init/pull", json={"datatype": "FP64"}).json()["params"]}
    np.testing.assert_array_equal(got["a"], -np.arange(PIECE // 2 + 3.0))
    np.testing.assert_array_equal(got["c"], np.arange(9.0))


def test_a_large_push_never_holds_its_body(client: httpx.Client, live: Live) -> None:
    n = 8 * PIECE // 4  # 32 MiB of FP32
    r = client.post("/v2/sessions", json={"session_id": "mem", "algorithm": "ALGORITHM_ADAM",
                                          "tensors": [{"name": "w", "shape": [n]}]})
    assert r.status_code == 201, r.text
    data = np.full(n, 0.5, dtype=np.float32).tobytes()
    head = json.dumps({"gradients": [{"name": "w", "shape": [n], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(data)}}]}).encode()
    view = memoryview(data)
    segments = [head, *(view[i:i + (1 << 20)] for i in range(0, len(view), 1 << 20))]
    headers = _binary_headers(head, len(head) + len(data))
    assert send(live.port, "/v2/sessions/mem/push", segments, headers).status == 200  # warm-up
    tracemalloc.start()
    try:
        answer = send(live.port, "/v2/sessions/mem/push", segments, headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status == 200 and answer.json()["step"] == 2, answer.body
    # the body is 32 MiB; what the server held of it at once is two pieces and change
    assert peak < 3 * PIECE, peak


# -- refused before the tensor bytes are read -------------------------------------------


@pytest.fixture
def victim(client: httpx.Client, live: Live) -> Iterator[str]:
    sid = "victim-lean"
    if sid not in [s.id for s in live.store.all()]:
        _create(client, sid, TENSORS, workers={"count": 2, "mode": "WORKER_MODE_SYNC"})
    before = live.store.get(sid).fingerprint()
    yield sid
    assert live.store.get(sid).fingerprint() == before


def _declared(fields: dict[str, Any] | None = None) -> tuple[bytes, int]:
    grads = {n: b"\0" * (int(np.prod(s)) * codec.itemsize(dt)) for n, s, dt in TENSORS}
    head, payload = _body(grads, TENSORS, **(fields or {}))
    return head, len(payload)


EARLY: list[tuple[str, str, dict[str, Any], int, int, str, str]] = [
    # (case, path, JSON fields, declared bytes - right ones, status, reason, message)
    ("unknown session", "/v2/sessions/nope/step", {}, 0, 404, "SESSION_NOT_FOUND",
     "session 'nope' does not exist"),
    ("a push for a step not reached", "/v2/sessions/victim-lean/push", {"base_step": 5}, 0,
     409, "PUSH_AHEAD", "push computed from step 5"),
    ("Content-Length beyond the tensors", "/v2/sessions/victim-lean/step", {}, 3, 400,
     "INVALID_ARGUMENT", "binary_data_size add up to"),
    ("Content-Length short of the tensors", "/v2/sessions/victim-lean/step", {}, -2, 400,
     "INVALID_ARGUMENT", "binary data ends at byte"),
]


@pytest.mark.parametrize(("path", "fields", "delta", "status", "reason", "message"),
                         [e[1:] for e in EARLY], ids=[e[0] for e in EARLY])
def test_refused_before_the_bytes(live: Live, victim: str, path: str, fields: dict[str, Any],
                                  delta: int, status: int, reason: str, message: str) -> None:
    head, size = _declared(fields)
    answer = send_head_only(live.port, path, head, _binary_headers(head),
                            len(head) + size + delta)
    assert answer.status == status, answer.body
    body = answer.json()
    assert body["reason"] == reason and message in body["error"], body


def test_header_checks_come_before_any_byte(live: Live, victim: str) -> None:
    path = f"/v2/sessions/{victim}/step"
    # a JSON part over the limit: 413 from the header length alone
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(_head(path, {"content-type": OCTET, "adamserve-header-length":
                                  str(MAX_JSON + 1), "content-length": str(1 << 30)}))
        answer = _read_answer(sock)
    assert answer.status == 413 and answer.json()["reason"] == "QUOTA_EXCEEDED", answer.body
    assert f"the limit is {MAX_JSON}" in answer.json()["error"]
    # a header length past the Content-Length
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(_head(path, {"content-type": OCTET, "adamserve-header-length": "500",
                                  "content-length": "100"}))
        answer = _read_answer(sock)
    assert answer.status == 400, answer.body
    assert "Adamserve-Header-Length is 500 bytes, beyond the body's 100" in answer.json()["error"]


# -- bodies that break their word -------------------------------------------------------


def test_bodies_cut_short_or_too_long_change_nothing(live: Live, victim: str) -> None:
    path = f"/v2/sessions/{victim}/step"
    grads = _gradients(1, TENSORS)
    head, payload = _body(grads, TENSORS)
    # chunked: more bytes than the tensors declare
    answer = send_chunked(live.port, path, [head, payload, b"\0" * 9], _binary_headers(head))
    assert answer.status == 400, answer.body
    assert "binary_data_size add up to" in answer.json()["error"]
    assert "holds more bytes after the JSON header" in answer.json()["error"]
    # chunked: fewer, ending in the middle of the big tensor
    cut = len(payload) - 5000
    answer = send_chunked(live.port, path, [head, payload[:cut]], _binary_headers(head))
    assert answer.status == 400, answer.body
    assert "tensor 'big': binary data ends at byte" in answer.json()["error"]
    assert f"holds {cut} bytes after the JSON header" in answer.json()["error"]
    # chunked: ending in the middle of an element
    answer = send_chunked(live.port, path, [head, payload[:2003]], _binary_headers(head))
    assert answer.status == 400, answer.body
    assert "tensor 'half': binary data ends at byte" in answer.json()["error"]
    # Content-Length honest, then the client goes away halfway: nothing is applied
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(_head(path, _binary_headers(head, len(head) + len(payload)))
                     + head + payload[:len(payload) // 2])
        time.sleep(0.1)
    assert live.store.get(victim).opt.step_count == 0
    # a JSON part that says the sizes it needs but gives others
    wrong = head.replace(str(len(grads["big"])).encode(), str(len(grads["big"]) - 4).encode())
    answer = send(live.port, path, [wrong, payload],
                  _binary_headers(wrong, len(wrong) + len(payload)))
    assert answer.status == 400, answer.body
    assert "tensor 'big': binary_data_size is" in answer.json()["error"]


def test_the_server_keeps_serving_after_refusals(client: httpx.Client, live: Live,
                                                 victim: str) -> None:
    """Refused bodies are left unread; the connection and the server go on."""
    head, size = _declared()
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(_head("/v2/sessions/nope/step", _binary_headers(head, len(head) + size))
                     + head)
        assert _read_answer(sock).status == 404
        sock.sendall(b"\0" * size)  # the body the server did not wait for
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        assert _read_answer(sock).status == 200
    threads = [threading.Thread(target=lambda: client.get("/healthz")) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.get(f"/v2/sessions/{victim}").json()["step"] == 0


# -- the direct routes ----------------------------------------------------------------


def test_direct_routes_answer_as_fastapi_would(client: httpx.Client, live: Live) -> None:
    """Steps and pushes are dispatched by the gate; their neighbours, methods and errors
    are answered as every other route's."""
    _create(client, "direct", [("w", (3,), "FP32")])
    grad = {"name": "w", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}
    r = client.post("/v2/sessions/direct/step", json={"gradients": [grad]})
    assert r.status_code == 200 and r.json()["step"] == 1, r.text
    assert len(r.json()["params"][0]["data"]) == 3
    r = client.get("/v2/sessions/direct/step")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed", r.text
    r = client.post("/v2/sessions/direct/step/more", json={"gradients": [grad]})
    assert r.status_code == 404, r.text
    r = client.post("/v2/sessions/direct/push", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"], r.text
    r = client.post("/v2/sessions/a%2Fb/step", json={"gradients": [grad]})
    assert r.status_code == 404, r.text
    metrics = client.get("/metrics").text  # counted under the route's name, as the others
    assert 'adamserve_requests_total{code="200",method="step",transport="http"}' in metrics
    assert 'adamserve_requests_total{code="400",method="push",transport="http"}' in metrics


def test_a_stalled_body_is_refused(tmp_path: Path) -> None:
    store = SessionStore(CpuBackend(), CheckpointStore(tmp_path), Limits())
    service = OptimizerService(store)
    service.start()
    app = create_app(service, body_idle_timeout=0.5)
    with HttpServerThread(app) as server, httpx.Client(base_url=server.url) as c:
        _create(c, "s", [("w", (PIECE // 4,), "FP32")])
        head, payload = _body({"w": b"\0" * PIECE}, [("w", (PIECE // 4,), "FP32")])
        for chunked in (False, True):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                headers = _binary_headers(head, None if chunked else len(head) + len(payload))
                if chunked:
                    headers["transfer-encoding"] = "chunked"
                first = head + payload[:1000]
                sock.sendall(_head("/v2/sessions/s/push", headers)
                             + (b"%x\r\n%b\r\n" % (len(first), first) if chunked else first))
                started = time.monotonic()
                answer = _read_answer(sock)
            assert answer.status == 400, answer.body
            assert answer.json()["error"] == ("the request body stalled: nothing arrived for "
                                              "0.5 s after 1000 bytes of tensor data")
            assert time.monotonic() - started < 5
        assert c.get("/v2/sessions/s").json()["step"] == 0
