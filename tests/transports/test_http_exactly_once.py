"""HTTP: a step sent again with the same (worker_id, sequence) is acknowledged, not applied."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import SessionStore
from adamserve.transports.http import HttpServerThread, create_app


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[httpx.Client, OptimizerService]]:
    service = OptimizerService(SessionStore(CpuBackend(), CheckpointStore(tmp_path)))
    service.start()
    with HttpServerThread(create_app(service)) as http, \
            httpx.Client(base_url=http.url, timeout=30) as client:
        yield client, service


def test_resent_step(live: tuple[httpx.Client, OptimizerService]) -> None:
    c, service = live
    r = c.post("/v2/sessions", json={"session_id": "s", "algorithm": "ALGORITHM_ADAM",
                                     "tensors": [{"name": "w", "shape": [3]}]})
    assert r.status_code == 201, r.text
    body = {"gradients": [{"name": "w", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}],
            "worker_id": "w0", "sequence": 1}
    first = c.post("/v2/sessions/s/step", json=body).json()
    fp = service.store.get("s").fingerprint()
    again = c.post("/v2/sessions/s/step", json=body).json()
    pushed = c.post("/v2/sessions/s/push", json=body).json()
    assert (first["duplicate"], again["duplicate"], pushed["duplicate"]) == (False, True, True)
    assert again["params"] == first["params"] and again["step"] == 1
    assert service.store.get("s").fingerprint() == fp
    half = {**body, "worker_id": None}
    r = c.post("/v2/sessions/s/step", json=half)
    assert r.status_code == 400 and "worker_id and sequence go together" in r.json()["error"]
    assert service.store.get("s").fingerprint() == fp
