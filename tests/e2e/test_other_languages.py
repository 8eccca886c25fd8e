"""adamserve from other languages, with only the README and the .proto (issue 4).

* curl: the README's walkthrough is run by tests/test_readme.py.
* Node.js: ``node/session.js`` (@grpc/grpc-js + @grpc/proto-loader, pinned in
  ``node/package-lock.json`` and installed here with ``npm ci``) drives the same kind of
  session over gRPC; its parameters and exported state must match the Python client's.

It is skipped, with the reason, only where node and npm are absent.
A failing ``npm ci`` fails the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import adamserve_client as ac

from .conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path_factory.mktemp("other-languages") / "data").start()
    try:
        yield s
    finally:
        try:
            s.terminate(timeout=30)
        finally:
            s.kill()


def _server_log(s: ServerProcess) -> str:
    return s.log.read_text(errors="replace")[-3000:] if s.log.exists() else ""


# ---------------------------------------------------------------------------
# curl


# ---------------------------------------------------------------------------
# Node.js


def _installed_matches_lock() -> bool:
    """node_modules holds exactly what package-lock.json pins (npm's hidden lockfile
    node_modules/.package-lock.json says so), and the lock matches package.json."""
    try:
        lock = json.loads((NODE_DIR / "package-lock.json").read_text())
        pkg = json.loads((NODE_DIR / "package.json").read_text())
        hidden = json.loads((NODE_DIR / "node_modules" / ".package-lock.json").read_text())
    except (OSError, ValueError):
        return False
    if lock["packages"][""].get("dependencies") != pkg.get("dependencies"):
        return False
    want = {k: v.get("version") for k, v in lock["packages"].items() if k}
    have = {k: v.get("version") for k, v in hidden.get("packages", {}).items() if k}
    return want == have and all((NODE_DIR / k).is_dir() for k in want)


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """One ``npm ci`` at a time in NODE_DIR, across concurrent pytest processes."""
    key = hashlib.sha256(str(NODE_DIR).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"adamserve-npm-{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def node_project() -> Path:
    """tests/e2e/node with its pinned dependencies installed (``npm ci``, once)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: the Node.js gRPC client "
                    "test needs Node.js with npm")
    with _install_lock():
        if not _installed_matches_lock():
            env = {**os.environ, "npm_config_update_notifier": "false"}
            r = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                cwd=NODE_DIR, capture_output=True, text=True, timeout=600, env=env)
            if r.returncode != 0:
                pytest.fail(f"npm ci in {NODE_DIR} failed ({r.returncode}):\n"
                            f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}", pytrace=False)
            assert _installed_matches_lock(), "npm ci did not install what the lock pins"
    return NODE_DIR


SHAPES = {"w": [3, 5], "b": [5]}
LR, BETAS, WEIGHT_DECAY, STEPS = 0.05, (0.9, 0.99), 0.1, 3


def test_node_grpc_session_matches_python_client(
        server: ServerProcess, node_project: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    initial = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(STEPS)]
    plan = {
        "session_id": "node-session", "algorithm": "ALGORITHM_ADAMW",
        "groups": [{"values": {"lr": LR, "beta1": BETAS[0], "beta2": BETAS[1],
                               "weight_decay": WEIGHT_DECAY}}],
        "tensors": [{"name": k, "shape": s, "initial": initial[k].ravel().tolist()}
                    for k, s in SHAPES.items()],
        "steps": [{k: g[k].ravel().tolist() for k in SHAPES} for g in grads],
        "chunk_elements": 4,  # several chunks per tensor, the last one short
    }
    state_out = tmp_path / "node-state.safetensors"
    r = subprocess.run(["node", str(node_project / "session.js"), server.grpc_target,
                        json.dumps(plan), str(state_out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (f"session.js failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                               f"{_server_log(server)}")
    out = json.loads(r.stdout)
    assert out["created"] == {"session_id": "node-session", "algorithm": "ALGORITHM_ADAMW",
                              "step": 0,
                              "tensors": [{"name": k, "shape": s} for k, s in SHAPES.items()]}
    assert out["after_delete"] == "NOT_FOUND", out["after_delete"]
    assert out["after_delete_reason"] == "SESSION_NOT_FOUND", out
    assert [s["step"] for s in out["steps"]] == [1, 2, 3]
    assert not any(s["skipped"] for s in out["steps"])

    # The same session through the Python client.
    params = {k: v.copy() for k, v in initial.items()}
    opt = ac.AdamW(list(params.items()), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                   server=f"grpc://{server.grpc_target}", session="python-session")
    try:
        for n, g in enumerate(grads, 1):
            opt.step([g[k] for k in SHAPES])
            node_params = out["steps"][n - 1]["params"]
            assert set(node_params) == set(SHAPES)
            for k in SHAPES:
                np.testing.assert_allclose(np.asarray(node_params[k], np.float32),
                                           params[k].ravel(), rtol=1e-6, atol=1e-7,
                                           err_msg=f"step {n}, {k}")
        ref = opt.state_dict()
    finally:
        opt.close(delete=True)

    assert out["state_bytes"] == state_out.stat().st_size > 0
    state = load_file(state_out)
    with safe_open(str(state_out), "np") as f:
        meta = json.loads(f.metadata()["json"])
    assert meta["param_groups"][0]["param_names"] == list(SHAPES)
    for i, k in enumerate(SHAPES):
        assert meta["scalars"][str(i)]["step"] == ref["state"][i]["step"] == STEPS
        for slot in ("exp_avg", "exp_avg_sq"):
            got = state[f"state.{i}.{slot}"]
            assert list(got.shape) == SHAPES[k], (k, slot, got.shape)
            np.testing.assert_allclose(got, ref["state"][i][slot], rtol=1e-6, atol=1e-12,
                                       err_msg=f"{k}.{slot}")
