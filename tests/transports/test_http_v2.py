"""What v2 adds on HTTP: the proto's messages as JSON (field names, enums by name, typed
schedules, durations, absent optional fields), error reasons and metadata in the body,
and ListSessions' pages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from pydantic import BaseModel

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports import convert
from adamserve.transports.http import HttpServerThread, create_app, schemas
from adamserve_client.transports.http import ROUTES
from adamserve_proto import rpc
from adamserve_proto.v2 import optimizer_pb2 as pb

URL = "/v2/sessions"
GRAD = {"name": "w", "shape": [4], "datatype": "FP32", "data": [1.0, 1.0, 1.0, 1.0]}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[httpx.Client, SessionStore]]:
    store = SessionStore(CpuBackend(), CheckpointStore(tmp_path), Limits(max_state_bytes=1 << 24))
    service = OptimizerService(store)
    service.start()
    with HttpServerThread(create_app(service)) as http, \
            httpx.Client(base_url=http.url, timeout=30) as client:
        yield client, store


def _create(c: httpx.Client, sid: str, **extra: Any) -> dict[str, Any]:
    r = c.post(URL, json={"session_id": sid, "algorithm": "ALGORITHM_ADAM",
                          "tensors": [{"name": "w", "shape": [4]}], **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _refused(r: httpx.Response, status: int, reason: str, **metadata: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["reason"] == reason, body
    assert metadata.items() <= body["metadata"].items(), body
    return body


# ---------------------------------------------------------------------------
# the JSON is the proto's


def test_session_json_is_the_protos(live: tuple[httpx.Client, SessionStore]) -> None:
    c, _ = live
    info = _create(c, "s", dtype="STATE_DTYPE_FLOAT64", max_grad_norm=2.0,
                   groups=[{"values": {"lr": 0.01}, "flags": {"amsgrad": True}}],
                   workers={"count": 2, "mode": "WORKER_MODE_SYNC",
                            "straggler_timeout": "1.500s",
                            "straggler_policy": "STRAGGLER_POLICY_APPLY"},
                   labels={"team": "a"})
    # parsed by protobuf itself, it is a Session; written back, the same JSON
    msg = json_format.ParseDict(info, pb.Session())
    assert convert.message_json(msg) == info
    assert info["algorithm"] == "ALGORITHM_ADAM" and info["dtype"] == "STATE_DTYPE_FLOAT64"
    assert info["groups"][0]["flags"]["amsgrad"] is True
    assert info["groups"][0]["values"]["lr"] == 0.01
    assert info["workers"]["straggler_timeout"] == "1.500s"
    assert info["workers"]["straggler_policy"] == "STRAGGLER_POLICY_APPLY"
    assert info["max_grad_norm"] == 2.0 and info["labels"] == {"team": "a"}
    assert "checkpointed_step" not in info and "schedule" not in info
    c.post(f"{URL}/s/checkpoint").raise_for_status()
    assert c.get(f"{URL}/s").json()["checkpointed_step"] == 0


def test_typed_schedule_round_trips(live: tuple[httpx.Client, SessionStore]) -> None:
    c, _ = live
    schedule = {"join": {"schedules": [
        {"linear": {"start_factor": 0.0, "end_factor": 1.0, "total_steps": 5}},
        {"cosine": {"total_steps": 100, "eta_min": 0.0}}], "milestones": [5]}}
    info = _create(c, "sched", schedule=schedule)
    assert info["schedule"] == schedule and info["lr"] == [0.0]
    r = c.put(f"{URL}/sched/schedule", json={"schedule": {"step": {"step_size": 3}}})
    assert r.status_code == 200, r.text
    assert r.json()["schedule"] == {"step": {"step_size": 3, "gamma": 0.1}}
    r = c.put(f"{URL}/sched/schedule", json={
        "schedule": {"one_cycle": {"total_steps": 10, "anneal_strategy": "ANNEAL_STRATEGY_LINEAR",
                                   "cycle_momentum": False}}})
    one = r.json()["schedule"]["one_cycle"]
    assert one["anneal_strategy"] == "ANNEAL_STRATEGY_LINEAR" and one["cycle_momentum"] is False
    assert "max_lr" not in one and one["pct_start"] == 0.3
    r = c.put(f"{URL}/sched/schedule", json={})
    assert r.status_code == 200 and "schedule" not in r.json()
    before = c.get(f"{URL}/sched").json()
    for bad, message in [
        ({"schedule": {}}, "exactly one of the keys"),
        ({"schedule": {"cosine": {"total_steps": 0}}}, "schedule.total_steps"),
        ({"schedule": {"one_cycle": {"total_steps": 10, "anneal_strategy": "COS"}}},
         "unknown AnnealStrategy 'COS'"),
        ({"schedule": {"kind": "cosine"}}, "schedule.kind: Extra inputs are not permitted"),
    ]:
        body = _refused(c.put(f"{URL}/sched/schedule", json=bad), 400, "INVALID_ARGUMENT")
        assert message in body["error"], (message, body)
    assert c.get(f"{URL}/sched").json() == before


def test_step_status_and_commit(live: tuple[httpx.Client, SessionStore]) -> None:
    c, store = live
    _create(c, "one")
    r = c.post(f"{URL}/one/step", json={"gradients": [GRAD]}).json()
    assert {"step", "skipped", "grad_norm", "nonfinite", "duplicate", "pending",
            "params"} <= set(r) <= {"step", "skipped", "grad_norm", "nonfinite", "duplicate",
                                    "pending", "params", "round"}, r  # exchange: absent
    assert set(r.get("round", {})) <= {"round_id", "contributors", "missing_workers",
                                       "staleness"}
    _create(c, "ex", workers={"count": 1, "exchange": True})
    pushed = c.post(f"{URL}/ex/push", json={"gradients": [GRAD]}).json()
    assert pushed["pending"] and pushed["exchange"]["grad_sumsq"] == [4.0]
    before = store.get("ex").fingerprint()
    r = c.post(f"{URL}/ex/commit", json={"step": 1, "tensor_sumsq": [4.0], "total_sumsq": 4.0,
                                         "round_id": pushed.get("round", {}).get("round_id", 0),
                                         "skip_params": True})
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 1 and r.json()["params"] == []
    assert store.get("ex").fingerprint() != before
    again = c.post(f"{URL}/ex/commit", json={"step": 1, "tensor_sumsq": [4.0],
                                             "total_sumsq": 4.0, "return_datatype": "FP64"})
    assert [(p["name"], p["datatype"]) for p in again.json()["params"]] == [("w", "FP64")]


def test_request_models_have_the_protos_fields() -> None:
    """Each body model is its proto message's JSON form, less the session id the path
    carries, plus the HTTP-only fields (OIP tensors, binary_output)."""
    pairs: list[tuple[type[BaseModel], Any, set[str], set[str]]] = [
        (schemas.CreateSessionRequest, pb.SessionSpec, set(), {"initial"}),
        (schemas.AddTensorsRequest, pb.AddTensorsSpec, {"session_id"}, {"initial"}),
        (schemas.StepRequest, pb.StepHeader, {"session_id", "apply_as_received"},
         {"gradients", "binary_output"}),
        (schemas.PushRequest, pb.StepHeader,
         {"session_id", "apply_as_received", "return_datatype", "return_rows"}, {"gradients"}),
        (schemas.PullRequest, pb.PullRequest, {"session_id"}, {"binary_output"}),
        (schemas.CommitRequest, pb.CommitRequest, {"session_id"}, {"binary_output"}),
        (schemas.SetWorkersRequest, pb.SetWorkersRequest, {"session_id"}, set()),
        (schemas.RestoreCheckpointRequest, pb.RestoreCheckpointRequest, {"session_id"}, set()),
        (schemas.SetHyperparametersRequest, pb.SetHyperparametersRequest, {"session_id"},
         set()),
        (schemas.SetScheduleRequest, pb.SetScheduleRequest, {"session_id"}, set()),
        (schemas.Group, pb.Group, set(), set()),
        (schemas.Workers, pb.Workers, set(), set()),
        (schemas.TensorSpec, pb.TensorSpec, set(), set()),
        (schemas.Schedule, pb.Schedule, set(), set()),
        (schemas.OneCycleSchedule, pb.OneCycleSchedule, set(), set()),
        (schemas.JoinSchedule, pb.JoinSchedule, set(), set()),
        (schemas.Session, pb.Session, set(), set()),
        (schemas.StepResponse, pb.StepStatus, set(), {"params"}),
        (schemas.ListSessionsResponse, pb.ListSessionsResponse, set(), set()),
        (schemas.CheckpointInfo, pb.CheckpointInfo, set(), set()),
        (schemas.ListCheckpointsResponse, pb.ListCheckpointsResponse, set(), set()),
        (schemas.SharedMemoryRef, pb.SharedMemoryRef, set(), set()),
        (schemas.SharedMemoryRegion, pb.SharedMemoryRegion, set(), set()),
        (schemas.ListSharedMemoryResponse, pb.ListSharedMemoryResponse, set(), set()),
    ]
    for model, message, path_only, http_only in pairs:
        proto = {f.name for f in message.DESCRIPTOR.fields}
        assert set(model.model_fields) == (proto - path_only) | http_only, model.__name__
    for kind in pb.Schedule.DESCRIPTOR.fields:
        piece = getattr(schemas, kind.message_type.name)
        assert set(piece.model_fields) == {f.name for f in kind.message_type.fields}, kind.name


def test_every_rpc_has_a_route_on_both_sides(live: tuple[httpx.Client, SessionStore]) -> None:
    """The client's HTTP wire maps every RPC of the service to a route the server has
    (but StepUnary: an HTTP step is one request and one answer already)."""
    c, _ = live
    paths = c.get("/openapi.json").json()["paths"]
    assert set(ROUTES) == set(rpc.RPCS) - {"StepUnary"}
    for name, route in ROUTES.items():
        assert route.verb.lower() in paths.get(route.path, {}), (name, route)


# ---------------------------------------------------------------------------
# reasons in the body


def test_error_reasons(live: tuple[httpx.Client, SessionStore], tmp_path: Path) -> None:
    c, store = live
    _refused(c.get(f"{URL}/ghost"), 404, "SESSION_NOT_FOUND", session_id="ghost")
    _refused(c.post(f"{URL}/ghost/step", json={"gradients": [GRAD]}), 404, "SESSION_NOT_FOUND")
    _create(c, "sync", workers={"count": 2})
    for worker in ("a", "b"):
        r = c.post(f"{URL}/sync/push", json={"gradients": [GRAD], "worker_id": worker,
                                             "sequence": 1, "base_step": 0})
        assert r.status_code == 200, r.text
    before = store.get("sync").fingerprint()
    _refused(c.post(f"{URL}/sync/push", json={"gradients": [GRAD], "worker_id": "c",
                                              "sequence": 1, "base_step": 0}),
             409, "STALE_PUSH", session_id="sync", step="1", base_step="0")
    assert store.get("sync").fingerprint() == before
    _create(c, "slow", workers={"count": 2, "straggler_timeout": "0.2s"})
    before = store.get("slow").fingerprint()
    body = _refused(c.post(f"{URL}/slow/step", json={"gradients": [GRAD], "worker_id": "a",
                                                     "sequence": 1}), 409, "ROUND_ABORTED")
    assert body["code"] == "aborted" and "straggler timeout" in body["error"]
    assert store.get("slow").fingerprint() == before
    _refused(c.post(f"{URL}/slow/restore", json={"step": 7}), 404, "CHECKPOINT_NOT_FOUND")
    _refused(c.post(URL, json={"session_id": "big", "algorithm": "ALGORITHM_ADAM",
                               "tensors": [{"name": "w", "shape": [1 << 24]}]}),
             413, "QUOTA_EXCEEDED")
    assert "big" not in [s.id for s in store.all()]
    _refused(c.post(URL, json={"session_id": "bad"}), 400, "INVALID_ARGUMENT")
    _refused(c.get("/v2/nowhere"), 404, "INVALID_ARGUMENT")  # no such route: the request's
    # a server without a data directory
    service = OptimizerService(SessionStore(CpuBackend(), None))
    service.start()
    with HttpServerThread(create_app(service)) as http, \
            httpx.Client(base_url=http.url, timeout=30) as other:
        _create(other, "s")
        _refused(other.post(f"{URL}/s/checkpoint"), 409, "CHECKPOINTS_DISABLED")


# ---------------------------------------------------------------------------
# pages


def test_list_sessions_pages(live: tuple[httpx.Client, SessionStore]) -> None:
    c, _ = live
    names = [f"q{i:02d}" for i in range(7)]
    for name in reversed(names):
        _create(c, name)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        r = c.get(URL, params={"page_size": 3, "page_token": token})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["sessions"]) <= 3
        seen += [s["session_id"] for s in page["sessions"]]
        token = page["next_page_token"]
        pages += 1
        if not token:
            break
    assert seen == names and pages == 3
    whole = c.get(URL).json()
    assert [s["session_id"] for s in whole["sessions"]] == names
    assert whole["next_page_token"] == ""
    body = _refused(c.get(URL, params={"page_token": "nonsense"}), 400, "INVALID_ARGUMENT")
    assert "page_token" in body["error"]
    _refused(c.get(URL, params={"page_size": -1}), 400, "INVALID_ARGUMENT")
