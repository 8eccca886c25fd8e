"""kill -9 a real server at random moments while it steps and checkpoints.

After each restart every session must hold exactly the state of a checkpoint at or
after its last acknowledged one (bit for bit, compared with a local replay of the
same gradients), and no torn file may load.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec
from adamserve.transports.state_codec import decode_state

from .conftest import ServerProcess

SHAPES = {"emb": (1024, 512), "w": (512, 256), "b": (256,)}  # ~0.66M params, 8 MB per checkpoint
SESSIONS = ("a", "b")


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _binary(payload: dict[str, object], tensors: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(payload).encode()
    body = head + b"".join(t.astype("<f4").tobytes() for t in tensors)
    return body, {"content-type": "application/octet-stream",
                  "adamserve-header-length": str(len(head))}


def _tensor_entries(arrays: dict[str, np.ndarray]) -> list[dict[str, object]]:
    return [{"name": k, "shape": list(SHAPES[k]), "datatype": "FP32",
             "parameters": {"binary_data_size": arrays[k].size * 4}} for k in SHAPES]


def _create(c: httpx.Client, sid: str) -> None:
    rng = np.random.default_rng(7)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    body, headers = _binary({
        "session_id": sid, "algorithm": "ALGORITHM_ADAM",
        "groups": [{"values": {"lr": 1e-3}, "flags": {"amsgrad": True}}],
        "tensors": [{"name": k, "shape": list(s)} for k, s in SHAPES.items()],
        "initial": _tensor_entries(p0)}, list(p0.values()))
    r = c.post("/v2/sessions", content=body, headers=headers)
    assert r.status_code == 201, r.text


def _replay(steps: int) -> FlatOptimizer:
    layout = Layout(tuple(TensorSpec(k, s) for k, s in SHAPES.items()))
    rng = np.random.default_rng(7)
    p0 = np.concatenate([rng.standard_normal(s).astype(np.float32).ravel()
                         for s in SHAPES.values()])
    opt = FlatOptimizer("adam", layout, [{"lr": 1e-3, "amsgrad": True}], params=p0)
    for k in range(steps):
        g = _grads(k)
        opt.grad[:] = np.concatenate([g[n].ravel() for n in SHAPES])
        opt.step()
    return opt


def _train(url: str, sid: str, start: int, acked: dict[str, int], stop: threading.Event) -> None:
    """Push steps from ``start``; checkpoint every third step and record each ack."""
    with httpx.Client(base_url=url, timeout=30.0) as c:
        step = start
        while not stop.is_set():
            g = _grads(step)
            body, headers = _binary({"gradients": _tensor_entries(g)}, list(g.values()))
            try:
                r = c.post(f"/v2/sessions/{sid}/push", content=body, headers=headers)
                if r.status_code != 200:
                    return
                step += 1
                if step % 3 == 0:
                    r = c.post(f"/v2/sessions/{sid}/checkpoint")
                    if r.status_code == 200:
                        acked[sid] = r.json()["step"]
            except httpx.HTTPError:
                return  # the server died under us


def test_kill_9_restores_last_acknowledged_checkpoint(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    rnd = random.Random(42)
    data = tmp_path / "data"
    server = server_factory(data, "--checkpoint-every", "4").start()
    with server.client() as c:
        for sid in SESSIONS:
            _create(c, sid)
            assert c.post(f"/v2/sessions/{sid}/checkpoint").status_code == 200
    acked = dict.fromkeys(SESSIONS, 0)
    start = dict.fromkeys(SESSIONS, 0)
    replays: dict[int, FlatOptimizer] = {}
    for _round in range(3):
        stop = threading.Event()
        workers = [threading.Thread(target=_train, args=(server.http_url, sid, start[sid],
                                                         acked, stop)) for sid in SESSIONS]
        for w in workers:
            w.start()
        time.sleep(rnd.uniform(0.5, 1.5))
        server.kill()  # SIGKILL: no drain, no final checkpoint
        stop.set()
        for w in workers:
            w.join(30)
        server = server_factory(data, "--checkpoint-every", "4").start()
        with server.client() as c:
            for sid in SESSIONS:
                info = c.get(f"/v2/sessions/{sid}")
                assert info.status_code == 200, info.text
                restored = info.json()["step"]
                assert restored >= acked[sid], (sid, restored, acked[sid])
                if restored not in replays:
                    replays[restored] = _replay(restored)
                ref = replays[restored]
                pulled = c.post(f"/v2/sessions/{sid}/pull", json={"binary_output": True})
                n = int(pulled.headers["adamserve-header-length"])
                params = np.frombuffer(pulled.content[n:], dtype="<f4")
                np.testing.assert_array_equal(params, ref.param)
                state = decode_state(c.get(f"/v2/sessions/{sid}/state").content)
                for i in range(len(SHAPES)):
                    if restored:
                        np.testing.assert_array_equal(
                            state["state"][i]["max_exp_avg_sq"].ravel(),
                            ref.slots["max_exp_avg_sq"][ref.layout.span(i)])
                start[sid] = restored
    server.terminate()
    leftovers = list((data / "sessions").rglob(".tmp-*"))
    assert leftovers == []
