"""The HTTP transport against a real uvicorn server (127.0.0.1, port 0) and httpx.

Numbers are checked bit for bit against a local FlatOptimizer fed the same
gradients: FP32 on the wire with float32 state is exact. Every bad request is
checked for its status, its message, and that the session did not change.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.http import HttpServerThread, create_app

SPECS: list[tuple[str, tuple[int, ...]]] = [("w", (4, 3)), ("b", (3,)), ("e", (0,))]
HYPER: dict[str, Any] = {"lr": 0.01, "betas": [0.8, 0.99], "weight_decay": 0.1}
# HYPER as the wire's Group
GROUP: dict[str, Any] = {"values": {"lr": 0.01, "beta1": 0.8, "beta2": 0.99,
                                    "weight_decay": 0.1}}
MAX_STATE = 64 << 20
OCTET = "application/octet-stream"


@dataclass
class Live:
    url: str
    service: OptimizerService
    store: SessionStore
    data_dir: Path


def _service(data_dir: Path, limits: Limits | None = None
             ) -> tuple[OptimizerService, SessionStore]:
    store = SessionStore(CpuBackend(), CheckpointStore(data_dir), limits or Limits())
    service = OptimizerService(store)
    service.start()
    return service, store


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data_dir = tmp_path_factory.mktemp("http")
    service, store = _service(data_dir, Limits(max_state_bytes=MAX_STATE))
    server = HttpServerThread(create_app(service))
    server.start()
    yield Live(server.url, service, store, data_dir)
    server.stop()


@pytest.fixture
def client(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


# -- helpers --------------------------------------------------------------------


def rng_values(seed: int) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SPECS}


def json_tensor(name: str, arr: np.ndarray[Any, Any], datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "shape": list(arr.shape), "datatype": datatype,
            "data": arr.astype(np.float64).ravel().tolist()}


def create_body(sid: str, initial: dict[str, np.ndarray[Any, Any]] | None = None,
                **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session_id": sid, "algorithm": "ALGORITHM_ADAMW",
        "tensors": [{"name": n, "shape": list(s)} for n, s in SPECS],
        "groups": [GROUP],
    }
    if initial is not None:
        body["initial"] = [json_tensor(n, a) for n, a in initial.items()]
    body.update(extra)
    return body


def reference(initial: dict[str, np.ndarray[Any, Any]]) -> FlatOptimizer:
    layout = Layout(tuple(TensorSpec(n, s) for n, s in SPECS))
    flat = np.concatenate([initial[n].ravel() for n, _ in SPECS])
    return FlatOptimizer("adamw", layout, [dict(HYPER)], backend=CpuBackend(), dtype="float32",
                         params=flat)


def ref_step(opt: FlatOptimizer, grads: dict[str, np.ndarray[Any, Any]]) -> None:
    opt.grad[...] = np.concatenate([grads[n].ravel() for n, _ in SPECS])
    opt.step()


def ref_param(opt: FlatOptimizer, name: str) -> np.ndarray[Any, Any]:
    i = opt.layout.index(name)
    return np.asarray(opt.param[opt.layout.span(i)])


def binary_body(request: dict[str, Any], blobs: list[bytes],
                header: str = "Adamserve-Header-Length") -> dict[str, Any]:
    head = json.dumps(request).encode()
    return {"content": head + b"".join(blobs),
            "headers": {"Content-Type": OCTET, header: str(len(head))}}


def binary_tensor(name: str, shape: tuple[int, ...], datatype: str, nbytes: int) -> dict[str, Any]:
    return {"name": name, "shape": list(shape), "datatype": datatype,
            "parameters": {"binary_data_size": nbytes}}


def parse_binary(r: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    assert r.headers["content-type"] == OCTET
    n = int(r.headers["adamserve-header-length"])
    assert int(r.headers["inference-header-content-length"]) == n
    head = json.loads(r.content[:n])
    out: dict[str, bytes] = {}
    pos = n
    for t in head["params"]:
        size = t["parameters"]["binary_data_size"]
        out[t["name"]] = r.content[pos:pos + size]
        pos += size
    assert pos == len(r.content)
    return head, out


def fp32(data: list[float] | bytes) -> np.ndarray[Any, Any]:
    if isinstance(data, bytes):
        return np.frombuffer(data, dtype="<f4")
    return np.asarray(data, dtype=np.float32)


def create(client: httpx.Client, sid: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    r = client.post("/v2/sessions", json=create_body(sid, rng_values(seed), **extra))
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


# -- the happy paths ---------------------------------------------------------------


def test_create_and_json_steps_match_local_optimizer(client: httpx.Client, live: Live) -> None:
    init = rng_values(1)
    r = client.post("/v2/sessions", json=create_body("json3", init))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["step"] == 0 and info["algorithm"] == "ALGORITHM_ADAMW"
    assert info["session_id"] == "json3" and info["dtype"] == "STATE_DTYPE_FLOAT32"
    assert info["backend"] == "BACKEND_CPU" and "checkpointed_step" not in info
    assert info["groups"][0]["values"]["beta1"] == 0.8
    assert info["groups"][0]["values"]["beta2"] == 0.99
    assert info["groups"][0]["flags"]["amsgrad"] is False
    assert info["workers"] == {"count": 1, "mode": "WORKER_MODE_SYNC",
                               "straggler_policy": "STRAGGLER_POLICY_FAIL",
                               "scale_lr_by_staleness": False, "exchange": False}
    assert [t["name"] for t in info["tensors"]] == ["w", "b", "e"]
    ref = reference(init)
    for k in range(3):
        grads = rng_values(100 + k)
        r = client.post("/v2/sessions/json3/step",
                        json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
        assert r.status_code == 200, r.text
        ref_step(ref, grads)
        body = r.json()
        assert body["step"] == k + 1 and not body["skipped"] and body["nonfinite"] == []
        assert body["grad_norm"] == pytest.approx(
            math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
        params = {p["name"]: p for p in body["params"]}
        for name, shape in SPECS:
            assert params[name]["shape"] == list(shape)
            assert params[name]["datatype"] == "FP32"
            assert fp32(params[name]["data"]).tobytes() == ref_param(ref, name).tobytes()
    assert client.get("/v2/sessions/json3").json()["step"] == 3


def test_binary_steps_match_local_optimizer(client: httpx.Client) -> None:
    init = rng_values(2)
    create(client, "bin3", seed=2)
    ref = reference(init)
    for k in range(3):
        grads = rng_values(200 + k)
        req: dict[str, Any] = {
            "gradients": [binary_tensor(n, g.shape, "FP32", g.nbytes) for n, g in grads.items()]}
        headers: dict[str, str] = {}
        if k == 0:
            req["binary_output"] = True
        else:  # Accept selects binary output too; the Triton header name is accepted
            headers["Accept"] = OCTET
        kw = binary_body(req, [g.tobytes() for g in grads.values()],
                         header="Adamserve-Header-Length" if k < 2
                         else "Inference-Header-Content-Length")
        kw["headers"].update(headers)
        r = client.post("/v2/sessions/bin3/step", **kw)
        assert r.status_code == 200, r.text
        ref_step(ref, grads)
        head, blobs = parse_binary(r)
        assert head["step"] == k + 1
        for name, _ in SPECS:
            assert blobs[name] == ref_param(ref, name).tobytes()
    # a binary request with JSON output, and a push
    grads = rng_values(300)
    r = client.post("/v2/sessions/bin3/push", **binary_body(
        {"gradients": [binary_tensor(n, g.shape, "FP32", g.nbytes) for n, g in grads.items()]},
        [g.tobytes() for g in grads.values()]))
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 4 and "params" not in r.json()
    ref_step(ref, grads)
    r = client.post("/v2/sessions/bin3/pull", json={})
    params = {p["name"]: p for p in r.json()["params"]}
    for name, _ in SPECS:
        assert fp32(params[name]["data"]).tobytes() == ref_param(ref, name).tobytes()


def test_bf16_binary_both_ways(client: httpx.Client) -> None:
    init = rng_values(3)
    create(client, "bf16", seed=3)
    ref = reference(init)
    for k in range(2):
        grads32 = rng_values(400 + k)
        grads_bf = {n: torch.from_numpy(g).to(torch.bfloat16) for n, g in grads32.items()}
        blobs = [t.view(torch.int16).numpy().tobytes() for t in grads_bf.values()]
        req = {"gradients": [binary_tensor(n, tuple(t.shape), "BF16", t.numel() * 2)
                             for n, t in grads_bf.items()],
               "return_datatype": "BF16", "binary_output": True}
        r = client.post("/v2/sessions/bf16/step", **binary_body(req, blobs))
        assert r.status_code == 200, r.text
        ref_step(ref, {n: t.float().numpy() for n, t in grads_bf.items()})
        head, out = parse_binary(r)
        for t in head["params"]:
            assert t["datatype"] == "BF16"
        for name, _ in SPECS:
            expected = torch.from_numpy(ref_param(ref, name).copy()).to(torch.bfloat16)
            bits = np.frombuffer(out[name], dtype="<i2")
            assert np.array_equal(bits, expected.view(torch.int16).numpy().ravel())
    # the same values as JSON numbers
    r = client.post("/v2/sessions/bf16/pull", json={"datatype": "BF16", "names": ["w"]})
    (w,) = r.json()["params"]
    want = torch.from_numpy(ref_param(ref, "w").copy()).to(torch.bfloat16).float().numpy()
    assert np.array_equal(np.asarray(w["data"], dtype=np.float32), want)


def test_pull(client: httpx.Client) -> None:
    init = rng_values(4)
    create(client, "pull", seed=4)
    r = client.post("/v2/sessions/pull/pull", json={"names": ["b"], "datatype": "FP64"})
    assert r.status_code == 200, r.text
    (b,) = r.json()["params"]
    assert b["name"] == "b" and b["datatype"] == "FP64" and "parameters" not in b
    assert np.array_equal(np.asarray(b["data"]), init["b"].astype(np.float64))
    r = client.post("/v2/sessions/pull/pull", headers={"Accept": OCTET})  # empty body: all
    head, out = parse_binary(r)
    assert [t["name"] for t in head["params"]] == ["w", "b", "e"]
    assert out["w"] == init["w"].tobytes() and out["e"] == b""
    r = client.post("/v2/sessions/pull/pull", json={"names": ["nope"]})
    assert r.status_code == 400 and "'nope' is not in this session" in r.json()["error"]


def test_create_with_binary_initial_values(client: httpx.Client) -> None:
    init = rng_values(44)
    body = create_body("bin-init")
    body["initial"] = [binary_tensor("w", (4, 3), "FP64", 96),
                       {**json_tensor("b", init["b"]), "datatype": "FP16"}]
    r = client.post("/v2/sessions", **binary_body(body, [init["w"].astype(np.float64).tobytes()]))
    assert r.status_code == 201, r.text
    params = {p["name"]: p for p in client.post("/v2/sessions/bin-init/pull").json()["params"]}
    assert fp32(params["w"]["data"]).tobytes() == init["w"].tobytes()
    assert fp32(params["b"]["data"]).tobytes() == init["b"].astype(np.float16).astype(
        np.float32).tobytes()


def test_hyperparameters_change_mid_run(client: httpx.Client) -> None:
    init = rng_values(5)
    create(client, "hyper", seed=5)
    ref = reference(init)
    grads = rng_values(500)
    client.post("/v2/sessions/hyper/push",
                json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
    ref_step(ref, grads)
    r = client.patch("/v2/sessions/hyper/hyperparameters",
                     json={"group": 0, "changes": {"values": {"lr": 0.05, "beta1": 0.5,
                                                              "beta2": 0.9},
                                                   "flags": {"amsgrad": True}}})
    assert r.status_code == 200, r.text
    group = r.json()["groups"][0]
    assert group["values"]["lr"] == 0.05 and group["flags"]["amsgrad"] is True
    assert r.json()["lr"] == [0.05]
    ref.set_hyperparameters(0, {"lr": 0.05, "betas": [0.5, 0.9], "amsgrad": True})
    for k in range(2):
        grads = rng_values(510 + k)
        r = client.post("/v2/sessions/hyper/step",
                        json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
        ref_step(ref, grads)
        params = {p["name"]: p for p in r.json()["params"]}
        assert fp32(params["w"]["data"]).tobytes() == ref_param(ref, "w").tobytes()


def test_add_tensors_mid_run_matches_local_optimizer(client: httpx.Client, live: Live) -> None:
    """A new group with JSON initial values, then a tensor joining group 0 in binary."""
    init = rng_values(6)
    create(client, "grow", seed=6)
    ref = reference(init)
    grads = rng_values(600)
    client.post("/v2/sessions/grow/push",
                json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
    ref_step(ref, grads)
    ck = client.post("/v2/sessions/grow/checkpoint").json()
    rng = np.random.default_rng(61)
    head = rng.standard_normal((2, 5)).astype(np.float32)
    r = client.post("/v2/sessions/grow/tensors", json={
        "tensors": [{"name": "head", "shape": [2, 5], "group": 1},
                    {"name": "hb", "shape": [5], "group": 1}],
        "new_group": {"values": {"lr": 0.05, "beta1": 0.7, "beta2": 0.9},
                      "flags": {"amsgrad": True}},
        "initial": [json_tensor("head", head)]})
    assert r.status_code == 200, r.text
    info = r.json()
    assert [(t["name"], t["group"]) for t in info["tensors"]] == [
        ("w", 0), ("b", 0), ("e", 0), ("head", 1), ("hb", 1)]
    assert info["step"] == 1 and info["lr"] == [0.01, 0.05]
    assert info["groups"][1]["values"]["beta1"] == 0.7
    assert info["groups"][1]["flags"]["amsgrad"] is True
    assert info["groups"][0] == client.get("/v2/sessions/grow").json()["groups"][0]
    assert info["checkpointed_step"] == ck["step"] == 1
    assert (live.data_dir / ck["path"]).is_dir() and ck["path"].startswith("sessions/grow/")
    ref.add_tensors([TensorSpec("head", (2, 5), 1), TensorSpec("hb", (5,), 1)],
                    np.concatenate([head.ravel(), np.zeros(5, np.float32)]),
                    {"lr": 0.05, "betas": [0.7, 0.9], "amsgrad": True})
    extra = rng.standard_normal(3)  # FP64 on the wire, binary layout
    r = client.post("/v2/sessions/grow/tensors", **binary_body(
        {"tensors": [{"name": "extra", "shape": [3]}], "new_group": None,
         "initial": [binary_tensor("extra", (3,), "FP64", 24)]}, [extra.tobytes()]))
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()["tensors"]][-1] == "extra"
    assert len(r.json()["groups"]) == 2
    ref.add_tensors([TensorSpec("extra", (3,), 0)], extra.astype(np.float32))
    params = {p["name"]: p for p in client.post("/v2/sessions/grow/pull").json()["params"]}
    for t in ref.layout.tensors:
        assert fp32(params[t.name]["data"]).tobytes() == ref_param(ref, t.name).tobytes(), t
    for k in range(2):
        grads = {**rng_values(610 + k), "head": rng.standard_normal((2, 5)).astype(np.float32),
                 "hb": rng.standard_normal(5).astype(np.float32),
                 "extra": rng.standard_normal(3).astype(np.float32)}
        r = client.post("/v2/sessions/grow/step",
                        json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
        assert r.status_code == 200, r.text
        for t in ref.layout.tensors:
            ref.grad[ref.layout.span(ref.layout.index(t.name))] = grads[t.name].ravel()
        ref.step()
        params = {p["name"]: p for p in r.json()["params"]}
        for t in ref.layout.tensors:
            assert fp32(params[t.name]["data"]).tobytes() == ref_param(ref, t.name).tobytes(), t
    assert r.json()["step"] == 3


def test_set_parameters_mid_run_matches_local_optimizer(client: httpx.Client) -> None:
    """PUT /params overwrites whole tensors (JSON or binary) and keeps the moments."""
    initial = rng_values(11)
    create(client, "set-params", seed=11)
    ref = reference(initial)
    grads = rng_values(12)
    body = {"gradients": [json_tensor(n, g) for n, g in grads.items()]}
    assert client.post("/v2/sessions/set-params/step", json=body).status_code == 200
    ref_step(ref, grads)
    w = np.full((4, 3), 0.25, np.float32)
    r = client.put("/v2/sessions/set-params/params", json={"values": [json_tensor("w", w)]})
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 1
    b = np.arange(3, dtype=np.float32)
    r = client.put("/v2/sessions/set-params/params", **binary_body(
        {"values": [binary_tensor("b", (3,), "FP32", 12)]}, [b.tobytes()]))
    assert r.status_code == 200, r.text
    ref.param[ref.layout.span(ref.layout.index("w"))] = w.ravel()
    ref.param[ref.layout.span(ref.layout.index("b"))] = b
    assert client.post("/v2/sessions/set-params/step", json=body).status_code == 200
    ref_step(ref, grads)
    out = client.post("/v2/sessions/set-params/pull", json={}).json()["params"]
    for t in out:
        np.testing.assert_array_equal(fp32(t["data"]), ref_param(ref, t["name"]), t["name"])
    client.delete("/v2/sessions/set-params")


def test_state_export_import_round_trip(client: httpx.Client, live: Live) -> None:
    create(client, "st-a", seed=6)
    for k in range(2):
        grads = rng_values(600 + k)
        client.post("/v2/sessions/st-a/push",
                    json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
    r = client.get("/v2/sessions/st-a/state")
    assert r.status_code == 200 and r.headers["content-type"] == OCTET
    blob = r.content
    assert blob[8:9] == b"{"  # a safetensors file
    # B: the same config, A's current params; importing A's state makes it A's twin
    params = client.post("/v2/sessions/st-a/pull").json()["params"]
    body = create_body("st-b")
    body["initial"] = params
    assert client.post("/v2/sessions", json=body).status_code == 201
    before_a = live.store.get("st-a").fingerprint()
    assert live.store.get("st-b").fingerprint() != before_a
    r = client.put("/v2/sessions/st-b/state", content=blob, headers={"Content-Type": OCTET})
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 2
    assert live.store.get("st-b").fingerprint() == before_a
    # putting A's own state back changes nothing
    assert client.put("/v2/sessions/st-a/state", content=blob).status_code == 200
    assert live.store.get("st-a").fingerprint() == before_a
    # and both take the same next step
    grads = rng_values(699)
    req = {"gradients": [json_tensor(n, g) for n, g in grads.items()]}
    ra = client.post("/v2/sessions/st-a/step", json=req).json()
    rb = client.post("/v2/sessions/st-b/step", json=req).json()
    assert ra == rb


def test_checkpoint(client: httpx.Client, live: Live) -> None:
    create(client, "ckpt", seed=7)
    grads = rng_values(700)
    client.post("/v2/sessions/ckpt/push",
                json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
    r = client.post("/v2/sessions/ckpt/checkpoint")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"] == "ckpt" and body["step"] == 1 and body["size_bytes"] > 0
    # relative to the data directory: a reply never names the server's absolute path
    assert body["path"].startswith("sessions/ckpt/ckpt-") and str(live.data_dir) not in r.text
    assert (live.data_dir / body["path"]).is_dir()
    assert client.get("/v2/sessions/ckpt").json()["checkpointed_step"] == 1


def test_list_describe_delete(client: httpx.Client, live: Live) -> None:
    create(client, "del-1")
    create(client, "del-2")
    client.post("/v2/sessions/del-1/checkpoint")
    listed = client.get("/v2/sessions").json()
    ids = [s["session_id"] for s in listed["sessions"]]
    assert {"del-1", "del-2"} <= set(ids) and ids == sorted(ids)
    assert listed["next_page_token"] == ""
    assert client.get("/v2/sessions/del-2").json()["session_id"] == "del-2"
    r = client.delete("/v2/sessions/del-1")
    assert r.status_code == 204 and r.content == b""
    assert not (live.data_dir / "sessions" / "del-1").exists()
    r = client.get("/v2/sessions/del-1")
    assert r.status_code == 404
    body = r.json()
    assert {k: body[k] for k in ("error", "code", "reason")} == {
        "error": "session 'del-1' does not exist", "code": "not_found",
        "reason": "SESSION_NOT_FOUND"}
    assert body["metadata"].get("session_id", "del-1") == "del-1"
    assert client.delete("/v2/sessions/del-1").status_code == 404
    assert "del-1" not in [s["session_id"]
                           for s in client.get("/v2/sessions").json()["sessions"]]


def test_health_ready_metrics(client: httpx.Client, tmp_path: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "adamserve_steps_total" in r.text
    assert 'adamserve_bytes_in_total{transport="http"}' in r.text
    assert 'adamserve_requests_total{code="200",method="healthz",transport="http"}' in r.text
    # a service that has not started yet: alive, not ready
    store = SessionStore(CpuBackend(), CheckpointStore(tmp_path))
    with HttpServerThread(create_app(OptimizerService(store))) as server:
        assert httpx.get(server.url + "/healthz").status_code == 200
        r = httpx.get(server.url + "/readyz")
        assert r.status_code == 503 and r.json() == {"status": "starting"}


def test_bearer_token(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)
    with HttpServerThread(create_app(service, token="s3cret")) as server, \
            httpx.Client(base_url=server.url) as c:
        wrong: list[dict[str, Any]] = [
            {}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret2"},
            {"Authorization": "Bearer s3cr\u00e9t".encode("latin-1")}]
        for headers in wrong:
            r = c.get("/v2/sessions", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["code"] == "unauthenticated" and "Bearer <key>" in r.json()["error"]
            assert r.json()["reason"] == "UNAUTHENTICATED"
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v2/sessions", json=create_body("tok"))
        assert r.status_code == 401 and "tok" not in service.store._sessions
        assert c.get("/metrics").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v2/sessions", headers=ok).status_code == 200
        assert c.post("/v2/sessions", json=create_body("tok"), headers=ok).status_code == 201
        assert c.get("/metrics", headers=ok).status_code == 200
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path
        assert "bearer" in json.dumps(c.get("/openapi.json").json()["components"]).lower()


def test_openapi_documents_binary_bodies(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    step = spec["paths"]["/v2/sessions/{session_id}/step"]["post"]
    content = step["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/StepRequest"}
    assert "binary_data_size" in content[OCTET]["schema"]["description"]
    assert any(p["name"] == "Adamserve-Header-Length" for p in step["parameters"])
    assert OCTET in step["responses"]["200"]["content"]
    for name in ("StepRequest", "PushRequest", "PullRequest", "CreateSessionRequest",
                 "AddTensorsRequest", "TensorIn", "StepResponse", "ErrorBody"):
        assert name in spec["components"]["schemas"], name
    add = spec["paths"]["/v2/sessions/{session_id}/tensors"]["post"]
    assert add["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AddTensorsRequest"}
    assert OCTET in add["requestBody"]["content"]
    assert add["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Session"}
    assert {"400", "404", "413"} <= set(add["responses"])
    assert "add_param_group" in add["description"]
    state = spec["paths"]["/v2/sessions/{session_id}/state"]
    assert OCTET in state["put"]["requestBody"]["content"]
    assert OCTET in state["get"]["responses"]["200"]["content"]
    assert client.get("/docs").status_code == 200


def test_nonfinite_values_in_json(client: httpx.Client, live: Live) -> None:
    # skip_nonfinite off: a NaN gradient goes through and JSON carries NaN back
    create(client, "nan-through", skip_nonfinite=False)
    raw = ('{"gradients": [{"name": "b", "shape": [3], "data": [NaN, "inf", 1.0]}]}')
    r = client.post("/v2/sessions/nan-through/step", content=raw,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    b = {p["name"]: p for p in r.json()["params"]}["b"]["data"]  # json.loads reads NaN
    assert math.isnan(b[0]) and math.isnan(b[1]) and math.isfinite(b[2])


def test_concurrent_steps_serialise(client: httpx.Client, live: Live) -> None:
    create(client, "conc")
    grads = rng_values(800)
    req = {"gradients": [json_tensor(n, g) for n, g in grads.items()]}
    steps: list[int] = []

    def worker() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            for _ in range(5):
                steps.append(c.post("/v2/sessions/conc/push", json=req).json()["step"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(steps) == list(range(1, 21))


# -- bad input: status, message, and no change ---------------------------------------


VICTIM = "victim"


@pytest.fixture
def victim(client: httpx.Client, live: Live) -> Iterator[str]:
    if VICTIM not in [s.id for s in live.store.all()]:
        create(client, VICTIM, seed=9)
        grads = rng_values(900)
        client.post(f"/v2/sessions/{VICTIM}/push",
                    json={"gradients": [json_tensor(n, g) for n, g in grads.items()]})
    before = live.store.get(VICTIM).fingerprint()
    yield VICTIM
    assert live.store.get(VICTIM).fingerprint() == before


def _w(**kw: Any) -> dict[str, Any]:
    t = {"name": "w", "shape": [4, 3], "datatype": "FP32", "data": [0.5] * 12}
    t.update(kw)
    return t


def _bin(req: dict[str, Any], payload: bytes, header_len: int | str | None = None,
         **headers: str) -> dict[str, Any]:
    head = json.dumps(req).encode()
    h = {"Content-Type": OCTET, "Adamserve-Header-Length":
         str(len(head) if header_len is None else header_len), **headers}
    return {"content": head + payload, "headers": h}


W_BIN = binary_tensor("w", (4, 3), "FP32", 48)
STEP = f"/v2/sessions/{VICTIM}/step"
TENSORS = f"/v2/sessions/{VICTIM}/tensors"
PARAMS = f"/v2/sessions/{VICTIM}/params"

BAD: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("unknown session", "POST", "/v2/sessions/nope/step", {"json": {"gradients": [_w()]}},
     404, "session 'nope' does not exist"),
    ("unknown tensor", "POST", STEP, {"json": {"gradients": [_w(name="zz")]}},
     400, "tensor 'zz' is not in this session; expected one of w, b, e"),
    ("wrong shape", "POST", STEP,
     {"json": {"gradients": [_w(shape=[3, 4])]}}, 400, "expected shape [4, 3], got [3, 4]"),
    ("wrong data length", "POST", STEP, {"json": {"gradients": [_w(data=[1.0] * 11)]}},
     400, "tensor 'w': data has 11 values; shape [4, 3] needs 12"),
    ("unknown datatype", "POST", STEP, {"json": {"gradients": [_w(datatype="INT8")]}},
     400, "tensor 'w': unknown datatype 'INT8'; expected one of FP32, FP64, FP16, BF16"),
    ("unknown return datatype", "POST", STEP,
     {"json": {"gradients": [_w()], "return_datatype": "FP8"}}, 400, "return_datatype 'FP8'"),
    ("no data", "POST", STEP, {"json": {"gradients": [_w(data=None)]}},
     400, "tensor 'w': needs 'data' or parameters.binary_data_size"),
    ("duplicate tensor", "POST", STEP, {"json": {"gradients": [_w(), _w()]}},
     400, "tensor 'w' appears more than once"),
    ("no gradients", "POST", STEP, {"json": {"gradients": []}},
     400, "carries no gradient tensors"),
    ("misspelt field", "POST", STEP, {"json": {"gradient": [_w()]}},
     400, "gradients: Field required; gradient: Extra inputs are not permitted"),
    ("garbage body", "POST", STEP, {"content": b"\x00\xffnot json at all"}, 400, "invalid JSON"),
    ("JSON not an object", "POST", STEP, {"json": [1, 2]}, 400, "body: Input should be an object"),
    ("negative dimension", "POST", STEP, {"json": {"gradients": [_w(shape=[-4, 3])]}},
     400, "gradients[0].shape[0]: Input should be greater than or equal to 0"),
    ("header length beyond body", "POST", STEP,
     _bin({"gradients": [W_BIN]}, b"\0" * 48, header_len=10_000),
     400, "Adamserve-Header-Length is 10000 bytes, beyond the body's"),
    ("header length not a number", "POST", STEP,
     _bin({"gradients": [W_BIN]}, b"\0" * 48, header_len="12x"),
     400, "Adamserve-Header-Length: expected a whole number of bytes, got '12x'"),
    ("header length cuts the JSON", "POST", STEP,
     _bin({"gradients": [W_BIN]}, b"\0" * 48, header_len=5), 400, "invalid JSON"),
    ("binary sizes short of body", "POST", STEP, _bin({"gradients": [W_BIN]}, b"\0" * 52),
     400, "binary_data_size add up to 48 bytes but the body holds 52"),
    ("binary sizes beyond body", "POST", STEP, _bin({"gradients": [W_BIN]}, b"\0" * 40),
     400, "binary data ends at byte 48 but the body holds 40"),
    ("binary size not the shape's", "POST", STEP,
     _bin({"gradients": [binary_tensor("w", (4, 3), "FP32", 24)]}, b"\0" * 24),
     400, "tensor 'w': binary_data_size is 24 bytes; shape [4, 3] of FP32 needs 48"),
    ("binary without header length", "POST", STEP,
     {"content": b"\0" * 48, "headers": {"Content-Type": OCTET}},
     400, "needs a Adamserve-Header-Length header"),
    ("binary size in a JSON request", "POST", STEP, {"json": {"gradients": [W_BIN]}},
     400, "binary_data_size needs a binary request"),
    ("data and binary size", "POST", STEP,
     _bin({"gradients": [{**W_BIN, "data": [0.0] * 12}]}, b"\0" * 48),
     400, "give either 'data' or parameters.binary_data_size, not both"),
    ("require_all", "POST", STEP, {"json": {"gradients": [_w()], "require_all": True}},
     400, "missing tensors: b"),
    ("huge shape", "POST", STEP, {"json": {"gradients": [_w(shape=[2**40, 2**40])]}},
     400, "at most 1099511627776"),
    ("bad hyperparameter value", "PATCH", f"/v2/sessions/{VICTIM}/hyperparameters",
     {"json": {"changes": {"values": {"lr": -1.0}}}}, 400,
     "lr: expected a value >= 0, got -1.0"),
    ("hyperparameter not a number", "PATCH", f"/v2/sessions/{VICTIM}/hyperparameters",
     {"json": {"changes": {"values": {"eps": "small"}}}}, 400,
     "changes.values.eps: Value error, expected a number"),
    ("hyperparameter overflows", "PATCH", f"/v2/sessions/{VICTIM}/hyperparameters",
     {"content": b'{"changes": {"values": {"eps": 1' + b"0" * 400 + b"}}}",
      "headers": {"Content-Type": "application/json"}}, 400, "expected a finite number"),
    ("flag not a bool", "PATCH", f"/v2/sessions/{VICTIM}/hyperparameters",
     {"json": {"changes": {"flags": {"amsgrad": 1.5}}}}, 400, "changes.flags.amsgrad"),
    ("unknown hyperparameter", "PATCH", f"/v2/sessions/{VICTIM}/hyperparameters",
     {"json": {"changes": {"values": {"momentum": 0.9}}}}, 400,
     "unknown hyperparameter 'momentum' for adamw"),
    ("group out of range", "PATCH", f"/v2/sessions/{VICTIM}/hyperparameters",
     {"json": {"group": 3, "changes": {"values": {"lr": 0.1}}}}, 400, "group 3 does not exist"),
    ("hyperparameters without changes", "PATCH", f"/v2/sessions/{VICTIM}/hyperparameters",
     {"json": {"values": {"lr": 0.1}}}, 400, "changes: Field required"),
    ("add: name clash", "POST", TENSORS,
     {"json": {"tensors": [{"name": "w", "shape": [2], "group": 1}], "new_group": {}}},
     400, "tensor names already in the session: w"),
    ("add: group index not the new group's", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2], "group": 2}], "new_group": {}}},
     400, "group 2 does not exist"),
    ("add: no new group", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2], "group": 1}]}},
     400, "group 1 does not exist"),
    ("add: unknown session", "POST", "/v2/sessions/nope/tensors",
     {"json": {"tensors": [{"name": "n", "shape": [2]}]}}, 404, "session 'nope' does not exist"),
    ("add: bad hyperparameter", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2], "group": 1}],
               "new_group": {"values": {"lr": -1}}}},
     400, "lr: expected a value >= 0, got -1.0"),
    ("add: unknown hyperparameter", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2], "group": 1}],
               "new_group": {"flags": {"nesterov": True}}}}, 400,
     "unknown hyperparameter 'nesterov'"),
    ("add: hyperparameter not a number", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2], "group": 1}],
               "new_group": {"values": {"lr": "x"}}}},
     400, "new_group.values.lr: Value error, expected a number"),
    ("add: repeated name", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2]}, {"name": "n", "shape": [2]}]}},
     400, "repeated: n"),
    ("add: initial of an old tensor", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2]}], "initial": [_w()]}},
     400, "tensor 'w' is not among the tensors being added"),
    ("add: initial of the wrong shape", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2]}], "initial": [_w(name="n")]}},
     400, "expected shape [2], got [4, 3]"),
    ("add: binary initial short of its size", "POST", TENSORS,
     _bin({"tensors": [{"name": "n", "shape": [4, 3]}], "initial": [{**W_BIN, "name": "n"}]},
          b"\0" * 40), 400, "binary data ends at byte 48 but the body holds 40"),
    ("add: huge shape", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2**40, 2**40]}]}}, 400, "at most"),
    ("add: over the memory cap", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [1 << 25]}]}}, 413, f"of {MAX_STATE} are free"),
    ("add: negative group", "POST", TENSORS,
     {"json": {"tensors": [{"name": "n", "shape": [2], "group": -1}]}},
     400, "tensors[0].group: Input should be greater than or equal to 0"),
    ("add: tensors missing", "POST", TENSORS, {"json": {"new_group": {}}},
     400, "tensors: Field required"),
    ("params: unknown tensor", "PUT", PARAMS, {"json": {"values": [_w(name="zz")]}},
     400, "tensor 'zz' is not in this session; expected one of w, b, e"),
    ("params: wrong shape", "PUT", PARAMS, {"json": {"values": [_w(shape=[3, 4])]}},
     400, "expected shape [4, 3], got [3, 4]"),
    ("params: short data", "PUT", PARAMS, {"json": {"values": [_w(data=[1.0] * 11)]}},
     400, "tensor 'w': data has 11 values; shape [4, 3] needs 12"),
    ("params: none", "PUT", PARAMS, {"json": {"values": []}},
     400, "carries no parameter tensors"),
    ("params: one good, one bad", "PUT", PARAMS,
     {"json": {"values": [_w(), _w(name="b", shape=[2, 6])]}}, 400,
     "expected shape [3], got [2, 6]"),
    ("params: binary short of its size", "PUT", PARAMS,
     _bin({"values": [W_BIN]}, b"\0" * 40), 400, "binary data ends at byte 48"),
    ("params: unknown session", "PUT", "/v2/sessions/nope/params",
     {"json": {"values": [_w()]}}, 404, "session 'nope' does not exist"),
    ("state blob garbage", "PUT", f"/v2/sessions/{VICTIM}/state",
     {"content": b"definitely not safetensors"}, 400, "state blob"),
    ("state blob empty", "PUT", f"/v2/sessions/{VICTIM}/state", {"content": b""},
     400, "fewer than 8 bytes"),
    ("unknown route", "GET", "/v2/nothing", {}, 404, "Not Found"),
    ("wrong method", "PUT", STEP, {"json": {}}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "message"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_change_nothing(client: httpx.Client, victim: str, method: str, path: str,
                                     kwargs: dict[str, Any], status: int, message: str) -> None:
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "code", "reason", "metadata"}
    assert message in body["error"], body
    assert body["reason"] == {404: "SESSION_NOT_FOUND", 413: "QUOTA_EXCEEDED"}.get(
        status, "INVALID_ARGUMENT") or path.endswith("/nothing"), body
    assert body["code"] == {400: "invalid_argument", 404: "not_found",
                            405: "method_not_allowed", 413: "resource_exhausted"}[status]


def _state_blob(meta_json: dict[str, Any]) -> bytes:
    from safetensors.numpy import save

    return bytes(save({"state.0.exp_avg": np.zeros((4, 3), np.float32)},
                      metadata={"adamserve": "state_dict/1", "json": json.dumps(meta_json)}))


@pytest.mark.parametrize("meta", [
    {"param_groups": 5},
    {"param_groups": ["x"]},
    {"param_groups": [{"params": [0, 1, 2], "param_names": ["w"]}]},
    {"param_groups": [{"params": "abc"}]},
    {"param_groups": [{"params": [0, 1, 2]}], "scalars": []},
    {"param_groups": [{"params": [0, 1, 2]}], "scalars": {"0": {"step": "x"}}},
    {"param_groups": [{"params": [0, 1, 2], "lr": "fast"}]},
    {"param_groups": [{"params": [0, 1, 2], "betas": [0.9]}]},
    {"param_groups": []},
])
def test_bad_state_blobs_change_nothing(client: httpx.Client, victim: str,
                                        meta: dict[str, Any]) -> None:
    r = client.put(f"/v2/sessions/{victim}/state", content=_state_blob(meta))
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_argument"


def test_nan_gradient_is_skipped(client: httpx.Client, live: Live, victim: str) -> None:
    bad = np.zeros((4, 3), np.float32)
    bad[1, 2] = np.nan
    r = client.post(f"/v2/sessions/{victim}/step", **_bin(
        {"gradients": [W_BIN], "binary_output": True}, bad.tobytes()))
    assert r.status_code == 200, r.text
    head, _ = parse_binary(r)
    assert head["skipped"] is True and head["nonfinite"] == ["w"] and head["step"] == 1
    raw = json.dumps({"gradients": [_w(data=[math.inf] * 12)]})  # Infinity literals
    r = client.post(f"/v2/sessions/{victim}/push", content=raw,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["skipped"] is True and r.json()["step"] == 1
    assert 'adamserve_skipped_steps_total' in client.get("/metrics").text


def test_create_errors(client: httpx.Client, live: Live, victim: str) -> None:
    n = len(live.store.all())
    cases: list[tuple[dict[str, Any], int, str]] = [
        (create_body(victim), 409, "session 'victim' already exists"),
        (create_body("c1", algorithm="adamw"), 400,
         "algorithm: Value error, unknown Algorithm 'adamw'; expected one of ALGORITHM_ADAM, "),
        (create_body("c1", algorithm="ALGORITHM_UNSPECIFIED"), 400, "algorithm: not set"),
        (create_body("c1", groups=[{"values": {"lr": -1}}]), 400, "lr: expected a value >= 0"),
        (create_body("c1", groups=[{"values": {"beta1": 0.9, "beta2": 1.5}}]), 400,
         "beta2: expected a value in [0, 1)"),
        (create_body("c1", groups=[{"flags": {"nesterov": True}}]), 400,
         "unknown hyperparameter 'nesterov'"),
        (create_body("c1", groups=[{"lr": 0.1}]), 400,
         "groups[0].lr: Extra inputs are not permitted"),
        (create_body("c1", dtype="float16"), 400,
         "dtype: Value error, unknown StateDtype 'float16'; expected one of STATE_DTYPE_FLOAT32"),
        (create_body("c1", workers={"count": 2, "mode": "sync"}), 400,
         "workers.mode: Value error, unknown WorkerMode 'sync'"),
        (create_body("c1", workers={"count": 2, "straggler_timeout": "30"}), 400,
         "workers.straggler_timeout: String should match pattern"),
        (create_body("c1", workers={"count": 2, "straggler_timeout": "-3s"}), 400,
         "workers.straggler_timeout: negative"),
        (create_body("c1", schedule={"cosine": {"total_steps": 0}}), 400,
         "schedule.total_steps: expected an integer >= 1"),
        (create_body("c1", schedule={"cosine": {"total_steps": 5}, "step": {}}), 400,
         "exactly one of the keys"),
        (create_body("c1", schedule={"kind": "cosine", "total_steps": 5}), 400,
         "schedule.kind: Extra inputs are not permitted"),
        (create_body("c1", max_grad_norm=-1), 400, "max_grad_norm"),
        (create_body("bad id!"), 400, "session id 'bad id!'"),
        (create_body("c1", tensors=[]), 400, "tensors: List should have at least 1 item"),
        (create_body("c1", tensors=[{"name": "w", "shape": [2]}, {"name": "w", "shape": [2]}]),
         400, "repeated: w"),
        (create_body("c1", tensors=[{"name": "w", "shape": [2], "group": 1}]),
         400, "group 1 does not exist"),
        ({**create_body("c1"), "initial": [_w(shape=[12])]}, 400,
         "expected shape [4, 3], got [12]"),
        ({**create_body("c1"), "initial": [_w(name="q")]}, 400,
         "tensor 'q' is not in this session"),
        (create_body("c1", tensors=[{"name": "w", "shape": [1 << 25]}]), 413,
         f"of {MAX_STATE} are free"),
        (create_body("c1", tensors=[{"name": "w", "shape": [2**40, 2]}]), 400, "elements; at most"),
    ]
    for body, status, message in cases:
        r = client.post("/v2/sessions", json=body)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["error"], (message, r.json())
        assert len(live.store.all()) == n, body


def test_body_caps(tmp_path: Path) -> None:
    service, store = _service(tmp_path)
    app = create_app(service, max_body_bytes=4096, max_json_bytes=1024)
    with HttpServerThread(app) as server, httpx.Client(base_url=server.url) as c:
        assert c.post("/v2/sessions", json=create_body("cap")).status_code == 201
        before = store.get("cap").fingerprint()
        big = {"gradients": [{"name": "w", "shape": [4, 3], "data": [0.125] * 12}] * 40}
        r = c.post("/v2/sessions/cap/step", json=big)  # JSON over 1 KiB
        assert r.status_code == 413 and r.json()["code"] == "resource_exhausted"
        assert "over the limit of 1024 bytes" in r.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield json.dumps(big).encode()

        r = c.post("/v2/sessions/cap/step", content=chunks(),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        # binary bodies get the larger cap; over it is a 413 too
        ok = _bin({"gradients": [W_BIN]}, np.ones(12, np.float32).tobytes())
        assert c.post("/v2/sessions/cap/push", **ok).status_code == 200
        before = store.get("cap").fingerprint()
        r = c.post("/v2/sessions/cap/push", **_bin({"gradients": [W_BIN]}, b"\0" * 5000))
        assert r.status_code == 413
        assert store.get("cap").fingerprint() == before
        # the server is still fine afterwards
        assert c.get("/v2/sessions/cap").json()["step"] == 1
