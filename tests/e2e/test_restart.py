"""Stop a real server (SIGTERM), start it again on the same data directory, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec

from .conftest import ServerProcess

SHAPES = {"w": [16, 8], "b": [8]}


def _create(c, sid: str, p0: dict[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    r = c.post("/v2/sessions", json={
        "session_id": sid, "algorithm": "ALGORITHM_ADAMW", "groups": [{"values": {"lr": 0.01}}],
        "tensors": [{"name": k, "shape": v} for k, v in SHAPES.items()],
        "initial": [{"name": k, "shape": SHAPES[k], "datatype": "FP32",
                     "data": p0[k].ravel().tolist()} for k in SHAPES]})
    assert r.status_code == 201, r.text


def _step(c, sid: str, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    r = c.post(f"/v2/sessions/{sid}/step", json={"gradients": [
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
        info = c.get("/v2/sessions/run1").json()
        assert info["step"] == 3
        for g in grads[3:]:
            out = _step(c, "run1", g)
        assert c.delete("/v2/sessions/run1").status_code in (200, 204)
    for g in grads:
        local.grad[:] = np.concatenate([g[k].ravel() for k in SHAPES])
        local.step()
    np.testing.assert_array_equal(np.concatenate([out[k] for k in SHAPES]), local.param)
    server.terminate()
    assert not (data / "sessions" / "run1").exists()  # delete removed its checkpoints


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_session_life_over_each_transport_equals_the_local_engine(
        tmp_path: Path, server_factory: type[ServerProcess], scheme: str) -> None:
    """create, step, push/pull, lr change mid-run, export/import, checkpoint, restart the
    server process, resume by name, delete: the result equals the engine run locally."""
    import adamserve_client as ac

    rng = np.random.default_rng(1)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(8)]
    layout = Layout(tuple(TensorSpec(k, tuple(v)) for k, v in SHAPES.items()))
    local = FlatOptimizer("adamw", layout, [{"lr": 0.01}],
                          params=np.concatenate([p0[k].ravel() for k in SHAPES]))

    def url(server: ServerProcess) -> str:
        return (f"grpc://{server.grpc_target}" if scheme == "grpc" else server.http_url)

    def local_step(g: dict[str, np.ndarray]) -> None:
        local.grad[:] = np.concatenate([g[k].ravel() for k in SHAPES])
        local.step()

    data = tmp_path / "data"
    server = server_factory(data).start()
    params = [p0[k].copy() for k in SHAPES]
    opt = ac.AdamW(params, lr=0.01, server=url(server), session="life")
    for g in grads[:3]:
        opt.step([g[k] for k in SHAPES])
        local_step(g)
    opt.param_groups[0]["lr"] = 0.003  # changed mid-run: sent before the next step
    local.set_hyperparameters(0, {"lr": 0.003})
    opt.step([grads[3][k] for k in SHAPES])
    local_step(grads[3])
    state = opt.state_dict()  # export ...
    opt.load_state_dict(state)  # ... and import: nothing may change
    assert opt.checkpoint().step == 4
    opt.close(delete=False)
    assert server.terminate() == 0

    server = server_factory(data).start()  # restart: new ports, same data directory
    params = [np.zeros_like(p0[k]) for k in SHAPES]
    opt = ac.AdamW(params, lr=0.003, server=url(server), session="life")  # resume by name
    np.testing.assert_array_equal(np.concatenate([p.ravel() for p in params]), local.param)
    assert opt.describe().step == 4
    for g in grads[4:]:
        opt.step([g[k] for k in SHAPES])
        local_step(g)
    opt.pull()
    np.testing.assert_array_equal(np.concatenate([p.ravel() for p in params]), local.param)
    opt.close(delete=True)
    with server.client() as c:
        assert c.get("/v2/sessions/life").status_code == 404
    server.terminate()
