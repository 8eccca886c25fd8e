"""Shared memory over HTTP: the /v2/shared-memory routes and steps that name regions
(gradients_region, params_region), against a real server on 127.0.0.1 and real
objects under /dev/shm; numbers against torch.optim.Adam, and the Python client's
HTTP wire carrying the same calls."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
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
from adamserve_client import errors
from adamserve_client.transports.base import RegionInfo, RegionRef
from adamserve_client.transports.http import HttpTransport
from tests.shm_objects import Obj

SHM = "/v2/shared-memory"
SHAPES = {"w": (4, 3), "b": (5,)}
NUMEL = sum(int(np.prod(s)) for s in SHAPES.values())


def _server(tmp_path: Path, allow: bool) -> tuple[HttpServerThread, OptimizerService]:
    store = SessionStore(CpuBackend(), CheckpointStore(tmp_path), Limits(max_state_bytes=1 << 26))
    service = OptimizerService(store, allow_shared_memory=allow)
    service.start()
    return HttpServerThread(create_app(service)), service


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[httpx.Client, OptimizerService]]:
    server, service = _server(tmp_path, allow=True)
    with server, httpx.Client(base_url=server.url, timeout=30) as c:
        yield c, service


def _refused(r: httpx.Response, status: int, reason: str, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "code", "reason", "metadata"}, body
    assert body["reason"] == reason, body
    for needle in needles:
        assert needle in body["error"], (needle, body)


def _create(c: httpx.Client, sid: str) -> None:
    r = c.post("/v2/sessions", json={
        "session_id": sid, "algorithm": "ALGORITHM_ADAM", "groups": [{"values": {"lr": 0.01}}],
        "tensors": [{"name": n, "shape": list(s)} for n, s in SHAPES.items()]})
    assert r.status_code == 201, r.text


def test_register_list_unregister(live: tuple[httpx.Client, OptimizerService],
                                  shm: Callable[[int], Obj]) -> None:
    c, service = live
    a, b = shm(4096), shm(8192)
    r = c.post(SHM, json={"name": "b-region", "key": b.key, "byte_size": 8192})
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "b-region", "key": b.key, "byte_size": 8192}
    assert c.post(SHM, json={"name": "a-region", "key": a.key, "byte_size": 1024}
                  ).status_code == 201
    # the same registration again is answered with the region (a retry)
    again = c.post(SHM, json={"name": "a-region", "key": a.key, "byte_size": 1024})
    assert again.status_code == 201 and again.json()["byte_size"] == 1024
    listed = c.get(SHM)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"regions": [
        {"name": "a-region", "key": a.key, "byte_size": 1024},
        {"name": "b-region", "key": b.key, "byte_size": 8192}]}
    assert [i.name for i in service.list_shared_memory()] == ["a-region", "b-region"]
    r = c.delete(f"{SHM}/a-region")
    assert r.status_code == 204 and r.content == b""
    assert [x["name"] for x in c.get(SHM).json()["regions"]] == ["b-region"]
    _refused(c.delete(f"{SHM}/a-region"), 404, "SHARED_MEMORY_NOT_FOUND", "a-region")


def test_registration_refusals(live: tuple[httpx.Client, OptimizerService],
                               shm: Callable[[int], Obj]) -> None:
    c, service = live
    obj = shm(4096)
    _refused(c.post(SHM, json={"name": "r", "key": f"adamserve-no-such-{uuid.uuid4().hex}",
                               "byte_size": 64}), 404, "SHARED_MEMORY_NOT_FOUND",
             "no shared-memory object")
    _refused(c.post(SHM, json={"name": "r", "key": obj.key, "byte_size": 1 << 20}), 400,
             "SHARED_MEMORY_OUT_OF_RANGE", "fewer than the 1048576 to register")
    _refused(c.post(SHM, json={"name": "r", "key": "../etc/passwd", "byte_size": 64}), 400,
             "INVALID_ARGUMENT", "shared-memory key '../etc/passwd'")
    _refused(c.post(SHM, json={"name": "r", "key": obj.key, "byte_size": -1}), 400,
             "INVALID_ARGUMENT", "byte_size: Input should be greater than or equal to 0")
    _refused(c.post(SHM, json={"name": "r", "key": obj.key}), 400, "INVALID_ARGUMENT",
             "byte_size: Field required")
    _refused(c.post(SHM, json={"name": "r", "key": obj.key, "byte_size": 64, "size": 1}),
             400, "INVALID_ARGUMENT", "size: Extra inputs are not permitted")
    assert c.post(SHM, json={"name": "r", "key": obj.key, "byte_size": 64}).status_code == 201
    _refused(c.post(SHM, json={"name": "r", "key": obj.key, "byte_size": 128}), 409,
             "SHARED_MEMORY_EXISTS", "'r' is registered already")
    assert [(i.name, i.byte_size) for i in service.list_shared_memory()] == [("r", 64)]


def test_a_server_without_shared_memory_refuses_every_call(
        tmp_path: Path, shm: Callable[[int], Obj]) -> None:
    server, service = _server(tmp_path, allow=False)
    obj = shm(4096)
    with server, httpx.Client(base_url=server.url, timeout=30) as c:
        _create(c, "s")
        for r in (c.post(SHM, json={"name": "r", "key": obj.key, "byte_size": 64}),
                  c.get(SHM), c.delete(f"{SHM}/r"),
                  c.post("/v2/sessions/s/step", json={
                      "gradients": [], "gradients_region": {"region": "r", "byte_size": 68}})):
            _refused(r, 409, "SHARED_MEMORY_DISABLED", "--allow-shared-memory")
        assert service.describe("s").step == 0


def _torch_adam(grads: list[dict[str, np.ndarray[Any, Any]]]) -> list[np.ndarray[Any, Any]]:
    """The flat float32 parameters after each step of torch's Adam from zeros."""
    params = {n: torch.zeros(s, dtype=torch.float32, requires_grad=True)
              for n, s in SHAPES.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.01)
    out = []
    for g in grads:
        for n, p in params.items():
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
        out.append(np.concatenate([p.detach().numpy().ravel() for p in params.values()]))
    return out


def test_steps_through_regions_match_torch(live: tuple[httpx.Client, OptimizerService],
                                           shm: Callable[[int], Obj]) -> None:
    c, _ = live
    size = NUMEL * 4
    obj = shm(2 * size + 16)
    assert c.post(SHM, json={"name": "io", "key": obj.key, "byte_size": 2 * size + 16}
                  ).status_code == 201
    _create(c, "s")
    rng = np.random.default_rng(0)
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
             for _ in range(3)]
    expected = _torch_adam(grads)
    for k, g in enumerate(grads):
        obj.map[16:16 + size] = np.concatenate([g[n].ravel() for n in SHAPES]).tobytes()
        r = c.post("/v2/sessions/s/step", json={
            "gradients": [], "binary_output": True,
            "gradients_region": {"region": "io", "offset": 16, "byte_size": size},
            "params_region": {"region": "io", "offset": 16 + size, "byte_size": size}})
        assert r.status_code == 200, r.text
        n = int(r.headers["adamserve-header-length"])
        head = r.json() if n == len(r.content) else None
        assert head is not None and head["step"] == k + 1 and head["params"] == []
        got = np.frombuffer(obj.map[16 + size:16 + 2 * size], dtype="<f4")
        np.testing.assert_allclose(got, expected[k], rtol=1e-6, atol=1e-7)
    # a push through a region: applied, nothing written, nothing sent back
    before = bytes(obj.map[16 + size:16 + 2 * size])
    r = c.post("/v2/sessions/s/push", json={
        "gradients": [], "gradients_region": {"region": "io", "offset": 16, "byte_size": size}})
    assert r.status_code == 200 and r.json()["step"] == 4, r.text
    assert bytes(obj.map[16 + size:16 + 2 * size]) == before


def test_region_step_refusals_change_nothing(live: tuple[httpx.Client, OptimizerService],
                                             shm: Callable[[int], Obj]) -> None:
    c, service = live
    size = NUMEL * 4
    obj = shm(size)
    assert c.post(SHM, json={"name": "g", "key": obj.key, "byte_size": size}).status_code == 201
    _create(c, "s")
    before = service.store.get("s").fingerprint()
    grad = {"name": "b", "shape": [5], "datatype": "FP32", "data": [1.0] * 5}
    step = "/v2/sessions/s/step"
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"gradients": [], "gradients_region": {"region": "nope", "byte_size": size}},
         404, "SHARED_MEMORY_NOT_FOUND", "no shared-memory region named 'nope'"),
        ({"gradients": [], "gradients_region": {"region": "g", "offset": 8, "byte_size": size}},
         400, "SHARED_MEMORY_OUT_OF_RANGE", "do not lie within region 'g'"),
        ({"gradients": [], "gradients_region": {"region": "g", "byte_size": size - 4}},
         400, "INVALID_ARGUMENT", f"byte_size {size - 4}, expected {size}"),
        ({"gradients": [], "gradients_region": {"region": "g", "byte_size": size // 2},
          "gradients_datatype": "BF16", "return_datatype": "FP8"},
         400, "INVALID_ARGUMENT", "return_datatype 'FP8'"),
        ({"gradients": [grad], "gradients_region": {"region": "g", "byte_size": size}},
         400, "INVALID_ARGUMENT", "carries gradient chunks too"),
        ({"gradients": [], "gradients_region": {"region": "g", "byte_size": size},
          "gradients_datatype": "INT8"}, 400, "INVALID_ARGUMENT", "'INT8'"),
        ({"gradients": [], "gradients_region": {"region": "g", "offset": -1,
                                                "byte_size": size}},
         400, "INVALID_ARGUMENT", "gradients_region.offset"),
        ({"gradients": [], "gradients_region": {"byte_size": size}},
         400, "INVALID_ARGUMENT", "gradients_region.region: Field required"),
        ({"gradients": [], "params_region": {"region": "nope", "byte_size": size}},
         400, "INVALID_ARGUMENT", "carries no gradient tensors"),
    ]
    for body, status, reason, needle in cases:
        _refused(c.post(step, json=body), status, reason, needle)
        assert service.store.get("s").fingerprint() == before, body


def test_the_python_clients_http_wire_carries_the_calls(
        live: tuple[httpx.Client, OptimizerService], shm: Callable[[int], Obj]) -> None:
    c, _ = live
    size = NUMEL * 4
    obj = shm(2 * size)
    url = str(c.base_url).rstrip("/")
    with HttpTransport(url) as t:
        info = t.register_shared_memory("wire", obj.key, 2 * size)
        assert info == RegionInfo("wire", obj.key, 2 * size)
        assert t.list_shared_memory() == [info]
        _create(c, "s")
        rng = np.random.default_rng(1)
        grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
                 for _ in range(2)]
        expected = _torch_adam(grads)
        for k, g in enumerate(grads):
            obj.map[:size] = np.concatenate([g[n].ravel() for n in SHAPES]).tobytes()
            result = t.step("s", [], gradients_region=RegionRef("wire", 0, size),
                            params_region=RegionRef("wire", size, size))
            assert result.step == k + 1 and not result.params
            np.testing.assert_allclose(np.frombuffer(obj.map[size:], dtype="<f4"),
                                       expected[k], rtol=1e-6, atol=1e-7)
        t.unregister_shared_memory("wire")
        assert t.list_shared_memory() == []
        with pytest.raises(errors.NotFound) as info_:
            t.unregister_shared_memory("wire")
        assert info_.value.reason == "SHARED_MEMORY_NOT_FOUND"
