"""adamserve from other languages, with only the README and the .proto (issue 4).

* curl: the README's "A whole session with `curl` alone" block, run verbatim by bash
  against a real ``adamserve serve`` (only its ``URL=`` line points at the test
  server); its answers are checked against a local FlatOptimizer.
* Node.js: ``node/session.js`` (@grpc/grpc-js + @grpc/proto-loader, pinned in
  ``node/package-lock.json`` and installed here with ``npm ci``) drives the same kind of
  session over gRPC; its parameters and exported state must match the Python client's.

Each is skipped, with the reason, only where its tool (curl; node and npm) is absent.
A failing ``npm ci`` fails the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import adamserve_client as ac
from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec

from .conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NODE_DIR = Path(__file__).resolve().parent / "node"
CURL_HEADING = "A whole session with `curl` alone"
README_URL_LINE = "URL=http://127.0.0.1:8000"


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


def readme_curl_block() -> str:
    """The ```sh block that follows the README's curl heading, as it stands."""
    text = README.read_text()
    at = text.find(CURL_HEADING)
    assert at >= 0, f"README.md has no {CURL_HEADING!r} section"
    m = re.compile(r"^```sh\n(.*?)^```", re.M | re.S).search(text, at)
    assert m is not None, f"no ```sh block after {CURL_HEADING!r} in README.md"
    return m.group(1)


def _json_documents(out: str) -> list[Any]:
    """The JSON documents curl printed back to back (the answers carry no newline)."""
    dec = json.JSONDecoder()
    docs, i = [], 0
    while True:
        while i < len(out) and out[i].isspace():
            i += 1
        if i == len(out):
            return docs
        try:
            doc, i = dec.raw_decode(out, i)
        except json.JSONDecodeError as e:
            raise AssertionError(f"curl printed something that is not JSON at {i}: "
                                 f"{out[i:i + 200]!r}") from e
        docs.append(doc)


def test_curl_session_from_readme(server: ServerProcess, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's curl session cannot be run")
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed: the README's curl session cannot be run")
    block = readme_curl_block()
    first, _, rest = block.partition("\n")
    assert first == README_URL_LINE, f"the README block should start with {README_URL_LINE}"
    script = f"URL={server.http_url}\n{rest}"
    # The requests, as the README writes them: what the answers must agree with.
    bodies = [json.loads(b) for b in re.findall(r"-d '(.*?)'", block, re.S)]
    assert len(bodies) == 2, "expected a create body and a step body in the README block"
    create, step_body = bodies
    assert "for i in 1 2 3; do" in block

    r = subprocess.run(["bash", "-e", "-u", "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, (f"the README's curl session failed ({r.returncode}):\n"
                               f"{r.stdout}\n{r.stderr}\n{_server_log(server)}")
    assert r.stderr == "", r.stderr  # curl -s: nothing but what the server sent

    # create, three steps; the export goes to a file and DELETE answers 204, empty.
    docs = _json_documents(r.stdout)
    assert len(docs) == 4, docs
    info, *steps = docs
    sid = create["session_id"]
    assert info["session_id"] == sid and info["algorithm"] == create["algorithm"], info
    assert info["step"] == 0 and "checkpointed_step" not in info, info

    # The same session, computed here (the proto's names as the engine's).
    specs = {t["name"]: t["shape"] for t in create["tensors"]}
    initial = {t["name"]: np.asarray(t["data"], np.float32) for t in create["initial"]}
    grads = {t["name"]: np.asarray(t["data"], np.float32) for t in step_body["gradients"]}
    algorithm = create["algorithm"].removeprefix("ALGORITHM_").lower()
    groups = [{**g.get("values", {}), **g.get("flags", {})} for g in create["groups"]]
    local = FlatOptimizer(algorithm,
                          Layout(tuple(TensorSpec(k, tuple(v)) for k, v in specs.items())),
                          groups, params=np.concatenate([initial[k].ravel() for k in specs]))
    for n, answer in enumerate(steps, 1):
        assert answer["step"] == n and answer["skipped"] is False, answer
        local.grad[:] = np.concatenate([grads[k].ravel() for k in specs])
        local.step()
        got = {t["name"]: t for t in answer["params"]}
        assert set(got) == set(specs), answer
        for i, (name, shape) in enumerate(specs.items()):
            assert got[name]["shape"] == shape and got[name]["datatype"] == "FP32"
            np.testing.assert_allclose(np.asarray(got[name]["data"], np.float32),
                                       local.tensor(local.param, i).ravel(),
                                       rtol=1e-6, atol=1e-7, err_msg=f"step {n}, {name}")

    # demo-state.safetensors: the torch-format state_dict after three steps.
    state_file = tmp_path / "demo-state.safetensors"
    assert state_file.is_file(), "the README's export wrote no file"
    state = load_file(state_file)
    with safe_open(str(state_file), "np") as f:
        meta = f.metadata()
    assert meta["adamserve"] == "state_dict/1", meta
    sd = json.loads(meta["json"])
    assert sd["scalars"]["0"]["step"] == 3 and sd["param_groups"][0]["param_names"] == ["w"]
    assert set(state) == {"state.0.exp_avg", "state.0.exp_avg_sq"}, sorted(state)
    for slot in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(state[f"state.0.{slot}"].ravel(), local.slots[slot],
                                   rtol=1e-6, atol=1e-12, err_msg=slot)

    # DELETE went through: the session is gone.
    with httpx.Client(base_url=server.http_url, timeout=30) as c:
        gone = c.get(f"/v2/sessions/{sid}")
    assert gone.status_code == 404, gone.text
    assert gone.json()["reason"] == "SESSION_NOT_FOUND", gone.text


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
