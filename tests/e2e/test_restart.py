"""Stop a real server (SIGTERM), start it again on the same data directory, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec

from .conftest import ServerProcess

SHAPES = {"w": [16, 8], "b": [8]}


def _create(c, sid: str, p0: dict[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    r = c.post("/v1/sessions", json={
        "session_id": sid, "algorithm": "adamw", "groups": [{"lr": 0.01}],
        "tensors": [{"name": k, "shape": v} for k, v in SHAPES.items()],
        "initial": [{"name": k, "shape": SHAPES[k], "datatype": "FP32",
                     "data": p0[k].ravel().tolist()} for k in SHAPES]})
    assert r.status_code == 201, r.text


def _step(c, sid: str, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    r = c.post(f"/v1/sessions/{sid}/step", json={"gradients": [
        {"name": k, "shape": SHAPES[k], "datatype": "FP32", "data": g[k].ravel().tolist()}
        for k in SHAPES]})
    assert r.status_code == 200, r.text
    return {t["name"]: np.array(t["data"], dtype=np.float32) for t in r.json()["params"]}


def test_sigterm_checkpoints_and_restart_resumes(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(6)]
    local = FlatOptimizer("adamw", Layout(tuple(TensorSpec(k, tuple(v))
                                                for k, v in SHAPES.items())),
                          [{"lr": 0.01}], params=np.concatenate([p0[k].ravel() for k in SHAPES]))

    data = tmp_path / "data"
    server = server_factory(data).start()
    with server.client() as c:
        _create(c, "run1", p0)
        for g in grads[:3]:
            _step(c, "run1", g)
    assert server.terminate() == 0  # SIGTERM: drain, checkpoint, exit 0

    server = server_factory(data).start()
    with server.client() as c:
        info = c.get("/v1/sessions/run1").json()
        assert info["step"] == 3
        for g in grads[3:]:
            out = _step(c, "run1", g)
        assert c.delete("/v1/sessions/run1").status_code in (200, 204)
    for g in grads:
        local.grad[:] = np.concatenate([g[k].ravel() for k in SHAPES])
        local.step()
    np.testing.assert_array_equal(np.concatenate([out[k] for k in SHAPES]), local.param)
    server.terminate()
    assert not (data / "sessions" / "run1").exists()  # delete removed its checkpoints
