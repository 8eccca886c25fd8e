"""The status page and its JSON, on a real HTTP server with tenants' keys, read by a
real headless browser (Debian's ``chromium`` package, driven over the DevTools
protocol): the page logs in with a key, renders a session's steps as SVG charts with
one point per step, refreshes while the session steps, and draws pixels (a screenshot
of an empty chart is the control). /docs and /redoc render from the server's own files.

The history's numbers are checked against torch (the lr of each step and of the
schedule's next steps: torch's own scheduler) and numpy (the gradient norm).
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import Access, OptimizerService
from adamserve.service.access import hash_key
from adamserve.sessions.history import History
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.http import HttpServerThread, create_app
from adamserve_client.transports.base import Sender, SessionSpec, TensorSpec, WireTensor, Workers

KEYS = {name: secrets.token_urlsafe(24) for name in ("a", "b", "admin")}
LR, TOTAL = 0.1, 40  # the sessions' base lr and cosine schedule length
SHAPE = (3, 4)


@dataclass
class Live:
    url: str
    service: OptimizerService


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    access = Access.from_mapping({"keys": [
        {"name": "alice", "tenant": "a", "role": "read-write", "sha256": hash_key(KEYS["a"])},
        {"name": "bob", "tenant": "b", "role": "read-write", "sha256": hash_key(KEYS["b"])},
        {"name": "ops", "role": "admin", "sha256": hash_key(KEYS["admin"])}]})
    store = SessionStore(CpuBackend(), None, Limits(max_state_bytes=1 << 26),
                         access.tenant_limits())
    service = OptimizerService(store)
    service.start()
    with HttpServerThread(create_app(service, access=access)) as http:
        yield Live(http.url, service)


_ids = itertools.count()


def _session(live: Live, steps: int, *, who: str = "a", workers: Workers | None = None
             ) -> tuple[Any, str, list[np.ndarray]]:
    """A new session of ``who``'s stepped ``steps`` times; its client and gradients."""
    sid = f"run{next(_ids)}-{secrets.token_hex(4)}"
    c = ac.connect(live.url, token=KEYS[who], retries=1)
    c.create_session(SessionSpec(sid, "adamw", (TensorSpec("w", SHAPE),), groups=({"lr": LR},),
                                 schedule={"kind": "cosine", "total_steps": TOTAL},
                                 workers=workers or Workers()))
    grads = [_step(c, sid, seed) for seed in range(steps)]
    return c, sid, grads


def _grad(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _wire(g: np.ndarray) -> list[WireTensor]:
    return [WireTensor("w", SHAPE, "FP32", g.tobytes())]


def _step(c: Any, sid: str, seed: int) -> np.ndarray:
    g = _grad(seed)
    c.step(sid, _wire(g))
    return g


def _get(live: Live, path: str, who: str | None = "a") -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
    return httpx.get(live.url + path, headers=headers, timeout=30)


def _torch_lrs(steps: int) -> list[float]:
    """torch's CosineAnnealingLR: the lr of each of the first ``steps`` updates."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# -- the JSON ---------------------------------------------------------------------------


def test_history_is_each_step_as_torch_and_numpy_compute_it(live: Live) -> None:
    c, sid, grads = _session(live, 6)
    h = _get(live, f"/v2/sessions/{sid}/history?future_steps=10").json()
    entries = h["entries"]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert (h["step"], h["recorded"], h["groups"], h["capacity"]) == (6, 6, 1, 1024)
    lrs = _torch_lrs(16)
    np.testing.assert_allclose([e["lr"][0] for e in entries], lrs[:6], rtol=1e-12)
    assert h["schedule"]["from_step"] == 7
    np.testing.assert_allclose(h["schedule"]["lr"][0], lrs[6:], rtol=1e-12)
    np.testing.assert_allclose([e["grad_norm"] for e in entries],
                               [np.linalg.norm(g.astype(np.float64)) for g in grads], rtol=1e-6)
    nbytes = int(np.prod(SHAPE)) * 4
    assert all(e["bytes_in"] == nbytes and e["bytes_out"] == nbytes for e in entries)
    assert all(e["latency_seconds"] > 0 and not e["skipped"] for e in entries)
    pct = h["latency_seconds"]
    assert pct["count"] == 6 and 0 < pct["p50"] <= pct["p90"] <= pct["p99"] <= pct["max"]
    assert len(_get(live, f"/v2/sessions/{sid}/history?last=2").json()["entries"]) == 2
    # a skipped step (non-finite gradient) is an entry for the step it would have been
    c.step(sid, _wire(np.full(SHAPE, np.nan, np.float32)))
    last = _get(live, f"/v2/sessions/{sid}/history").json()["entries"][-1]
    assert (last["step"], last["skipped"], last["nonfinite_tensors"]) == (7, True, 1)
    assert "grad_norm" not in last
    c.close()


def test_rounds_name_their_contributors_and_who_was_missing(live: Live) -> None:
    workers = Workers(count=2, straggler_timeout=0.2, straggler_policy="fail")
    c, sid, _ = _session(live, 0, workers=workers)
    w1, w2 = Sender("w1", 1), Sender("w2", 1)
    c.push(sid, _wire(_grad(1)), sender=w1)
    c.push(sid, _wire(_grad(2)), sender=w2)  # the round is full: step 1 applied
    c.push(sid, _wire(_grad(3)), sender=Sender("w1", 2))  # w2 never comes
    time.sleep(0.3)
    assert live.service.expire_rounds() == 1
    entries = _get(live, f"/v2/sessions/{sid}/history").json()["entries"]
    applied, failed = entries
    assert (applied["step"], applied["contributors"], applied["missing"]) == (1, 2, [])
    assert applied["bytes_in"] == 2 * int(np.prod(SHAPE)) * 4 and not applied["failed"]
    assert (failed["step"], failed["contributors"]) == (2, 1)
    assert failed["missing"] == ["w2"] and failed["missing_count"] == 1
    assert "straggler timeout" in failed["failed"]
    assert failed["bytes_in"] == int(np.prod(SHAPE)) * 4
    c.close()


def test_a_key_sees_its_tenants_sessions_only_and_the_shell_no_data(live: Live) -> None:
    _, sid, _ = _session(live, 1)
    assert _get(live, "/v2/status", who=None).status_code == 401
    assert _get(live, f"/v2/sessions/{sid}/history", who=None).status_code == 401
    mine = {s["session_id"] for s in _get(live, "/v2/status").json()["sessions"]}
    theirs = {s["session_id"] for s in _get(live, "/v2/status", who="b").json()["sessions"]}
    assert sid in mine and sid not in theirs
    missing = _get(live, f"/v2/sessions/{sid}/history", who="b")
    assert missing.status_code == 404 and missing.json()["reason"] == "SESSION_NOT_FOUND"
    admin = {s["session_id"] for s in _get(live, "/v2/status", who="admin").json()["sessions"]}
    assert f"a~{sid}" in admin
    assert _get(live, f"/v2/sessions/a~{sid}/history", who="admin").json()["entries"]
    bad = _get(live, f"/v2/sessions/{sid}/history?future_steps=-1")
    assert bad.status_code == 400 and "future_steps" in bad.json()["error"]
    for path in ("/", "/status.js", "/status.css", "/docs", "/redoc",
                 "/docs/swagger-ui-bundle.js", "/redoc/redoc.standalone.js"):
        r = _get(live, path, who=None)
        assert r.status_code == 200 and sid not in r.text, path
        if path in ("/", "/docs", "/redoc"):  # every file they load is this server's
            assert not re.search(r"(src|href)=\"(https?:)?//", r.text), path


def test_the_ring_buffer_keeps_its_newest_entries() -> None:
    h = History(capacity=8)
    for step in range(1, 21):
        h.record(step, (0.1 * step,), 1.0)
    h.traffic(20, 100, 50, 0.5)
    h.traffic(21, 7, 0)  # a push into a round not ended yet: kept for its entry
    h.record(21, (2.1,), None, contributors=2, missing=[f"w{i}" for i in range(40)])
    kept = h.snapshot()
    assert [e.step for e in kept] == list(range(14, 22)) and h.recorded == 21
    assert (kept[-2].bytes_in, kept[-2].bytes_out, kept[-2].latency) == (100, 50, 0.5)
    assert (kept[-1].bytes_in, kept[-1].contributors, kept[-1].missing_count) == (7, 2, 40)
    assert len(kept[-1].missing) == 32 and kept[-1].grad_norm is None
    assert h.nbytes < 8 * 128


# -- in a browser -----------------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("the status page's browser tests need Debian's chromium package: "
                    "apt-get install -y chromium")
    return path


class Browser:
    """Headless chromium over the DevTools protocol (a websocket: ``websockets``)."""

    def __init__(self) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="adamserve-chromium-")
        args = [_chromium(), "--headless=new", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", "--window-size=1280,1800", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # chromium refuses root without it
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}) before it listened")
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(found.group(1)) if found else None
        assert port is not None, "chromium did not open its DevTools port within 30 s"
        # its stderr keeps coming: drained, so chromium never blocks on a full pipe
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        self.ids = itertools.count(1)
        self.requests: list[str] = []
        self.call("Page.enable")
        self.call("Network.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("method") == "Network.requestWillBeSent":
                self.requests.append(msg["params"]["request"]["url"])
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg["result"])

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait(lambda: self.js("document.readyState") == "complete", f"{url} to load")

    def wait(self, ready: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"waited {timeout} s for {what}")

    def shot(self, selector: str) -> Any:
        """A screenshot of the element ``selector`` (a Pillow image)."""
        from PIL import Image

        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                      ".getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY, "
                      "width: r.width, height: r.height}; })()")
        png = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={**box, "scale": 1})["data"]
        return Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")

    def close(self) -> None:
        self.stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser()
    yield b
    b.close()


def _colored(image: Any) -> int:
    """Pixels of a series' colours: saturated ones (axes, grid and text are grey)."""
    rgb = np.asarray(image, dtype=np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def _points(b: Browser, selector: str) -> int:
    """Points of the polyline ``selector``, counted from its drawn coordinates."""
    return int(b.js(f"(() => {{ const p = document.querySelector({json.dumps(selector)}); "
                    "return p ? p.getAttribute('points').trim().split(/\\s+/).length : 0; })()"))


def _table_step(b: Browser, sid: str) -> int:
    cell = b.js(f"document.querySelector('tr[data-session=\"{sid}\"] td.step')?.textContent")
    return int(cell) if cell else -1


@pytest.mark.slow
def test_the_page_draws_a_sessions_steps_and_follows_them(live: Live, browser: Browser) -> None:
    c, sid, _ = _session(live, 8)
    _, empty, _ = _session(live, 0)  # the control: a session with no step
    b = browser
    b.open(f"{live.url}/?refresh=200&future=20#{sid}")
    b.wait(lambda: b.js("document.getElementById('login').hidden === false"),
           "the page to ask for a key")
    assert b.js("document.getElementById('main').hidden") is True  # and shows nothing
    b.js(f"document.getElementById('key').value = {json.dumps(KEYS['a'])}; "
         "document.querySelector('#login button').click()")
    b.wait(lambda: _points(b, '#chart-lr polyline[data-series="group 0"]') == 8,
           "the lr chart's 8 points")
    assert _points(b, '#chart-lr polyline[data-series="group 0 next"]') == 20
    for chart in ("grad norm", "latency"):
        assert _points(b, f'polyline[data-series="{chart}"]') == 8, chart
    assert _points(b, '#chart-bytes polyline[data-series="in"]') == 8
    assert _points(b, '#chart-skipped polyline') == 8
    assert _table_step(b, sid) == 8
    assert b.js("document.querySelectorAll('#sessions tbody tr').length") == len(
        _get(live, "/v2/status").json()["sessions"])
    drawn = _colored(b.shot("#chart-lr"))
    assert drawn > 300, f"the lr chart looks empty: {drawn} coloured pixels"

    # the page refreshes while the session steps
    seen = int(b.js("document.body.dataset.updates"))
    stepper = threading.Thread(target=lambda: [(_step(c, sid, s), time.sleep(0.05))
                                               for s in range(8, 20)])
    stepper.start()
    b.wait(lambda: _table_step(b, sid) == 20, "the table's step to reach 20")
    stepper.join()
    b.wait(lambda: _points(b, '#chart-grad-norm polyline') == 20, "20 grad norm points")
    assert int(b.js("document.body.dataset.updates")) > seen + 1

    # the control: an empty session's chart says so, and its screenshot shows no series
    b.js(f"location.hash = {json.dumps(empty)}")
    b.wait(lambda: b.js("document.getElementById('chart-grad-norm').dataset.empty"),
           "the empty session's charts")
    blank = _colored(b.shot("#chart-grad-norm"))
    assert blank < 20, f"an empty chart drew {blank} coloured pixels"
    c.close()


@pytest.mark.slow
def test_docs_and_redoc_render_from_the_servers_own_files(live: Live, browser: Browser) -> None:
    b = browser
    b.requests.clear()
    b.open(f"{live.url}/docs")
    b.wait(lambda: "adamserve" in (b.js(
        "document.querySelector('.swagger-ui .info .title')?.textContent") or ""),
        "Swagger UI's title")
    assert b.js("document.querySelectorAll('.opblock').length") > 10
    b.open(f"{live.url}/redoc")
    b.wait(lambda: "Create a session" in (b.js("document.body.innerText") or ""),
           "ReDoc's operations")
    b.js("0")  # drain the events so far
    outside = [u for u in b.requests if not u.startswith((live.url, "data:", "blob:"))]
    assert b.requests and not outside, f"requests beyond the server: {outside}"
