"""Input that can never make a 5xx: schedule and hyperparameter values bounded so that
no arithmetic overflows, a poisoned checkpoint manifest that cannot break listing or
describing, session ids matched as a whole, and user strings shortened in errors.

Every test runs a real server (gRPC and HTTP over one service, 127.0.0.1, port 0) and
talks to it over the wire: the client library, raw HTTP and raw gRPC stubs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

import adamserve_client as ac
from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.schedules import Cosine, Exponential, Schedule
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.http import HttpServerThread, create_app
from adamserve_client.transports import Client, SessionSpec, TensorSpec, WireTensor, connect
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

WIRES = ("grpc", "http")
W = (TensorSpec("w", (4,)),)
GRAD = [WireTensor("w", (4,), "FP32", np.ones(4, np.float32).tobytes())]


@dataclass
class Live:
    urls: dict[str, str]
    service: OptimizerService

    def client(self, wire: str) -> Client:
        return connect(self.urls[wire], timeout=60, retries=1)

    def stub(self) -> tuple[grpc.Channel, pb_grpc.OptimizerServiceStub]:
        channel = grpc.insecure_channel(self.urls["grpc"].removeprefix("grpc://"))
        return channel, pb_grpc.OptimizerServiceStub(channel)


@contextmanager
def serving(data_dir: Path, max_state_bytes: int = 64 << 20) -> Iterator[Live]:
    store = SessionStore(CpuBackend(), CheckpointStore(data_dir),
                         Limits(max_state_bytes=max_state_bytes))
    service = OptimizerService(store)
    service.start()
    grpc_server, port = build_grpc_server(service, port=0)
    try:
        with HttpServerThread(create_app(service)) as http:
            yield Live({"grpc": f"grpc://127.0.0.1:{port}", "http": http.url}, service)
    finally:
        grpc_server.stop(None)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with serving(tmp_path_factory.mktemp("bounds")) as server:
        yield server


_n = iter(range(1_000_000))


def new_id(wire: str) -> str:
    return f"{wire}-{next(_n)}"


def refused(call: Any, *parts: str) -> ac.InvalidArgument:
    """``call()`` is refused as INVALID_ARGUMENT with every one of ``parts`` in its message."""
    with pytest.raises(ac.InvalidArgument) as caught:
        call()
    err = caught.value
    assert err.reason == "INVALID_ARGUMENT", err
    for part in parts:
        assert part in err.message, (part, err.message)
    return err


# ---------------------------------------------------------------------------
# schedules and hyperparameters: every value bounded

COSINE = {"kind": "cosine", "total_steps": 100}
BAD_SCHEDULES = [  # (schedule, the field named, the range stated)
    ({"kind": "cosine", "total_steps": 2**62}, "schedule.total_steps", "[1, 1000000000000]"),
    ({"kind": "inverse_sqrt", "warmup_steps": 2**62}, "schedule.warmup_steps",
     "[1, 1000000000000]"),
    ({"kind": "step", "step_size": 10**13}, "schedule.step_size", "[1, 1000000000000]"),
    ({"kind": "one_cycle", "total_steps": 10**13}, "schedule.total_steps", "1000000000000"),
    ({"kind": "constant", "factor": 1e308}, "schedule.factor", ">= 0 and <= 1e+06"),
    ({"kind": "cosine", "total_steps": 10, "eta_min": 1e300}, "schedule.eta_min", "<= 1e+06"),
    ({"kind": "linear", "start_factor": 0.0, "end_factor": 1e9, "total_steps": 5},
     "schedule.end_factor", "<= 1e+06"),
    ({"kind": "one_cycle", "total_steps": 10, "div_factor": 1e-300}, "schedule.div_factor",
     ">= 1e-06 and <= 1e+06"),
    ({"kind": "one_cycle", "total_steps": 10, "final_div_factor": 1e300},
     "schedule.final_div_factor", "<= 1e+06"),
    ({"kind": "one_cycle", "total_steps": 10, "max_lr": 1e300}, "schedule.max_lr", "<= 1e+06"),
    ({"kind": "join", "schedules": [COSINE, COSINE], "milestones": [2**62]},
     "schedule.milestones[0]", "<= 1000000000000"),
    ({"kind": "join", "schedules": [COSINE, {"kind": "cosine", "total_steps": 2**62}],
      "milestones": [5]}, "schedule.schedules[1].total_steps", "[1, 1000000000000]"),
]


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize(("schedule", "field", "bound"), BAD_SCHEDULES)
def test_a_schedule_value_out_of_range_is_refused_naming_it(
        live: Live, wire: str, schedule: dict[str, Any], field: str, bound: str) -> None:
    sid = new_id(wire)
    with live.client(wire) as c:
        refused(lambda: c.create_session(SessionSpec(sid, "adam", W, schedule=schedule)),
                field, bound)
        c.create_session(SessionSpec(sid, "adam", W, schedule=COSINE))
        before = c.describe(sid)
        refused(lambda: c.set_schedule(sid, schedule), field, bound)
        assert c.describe(sid) == before
        c.step(sid, GRAD)  # the session goes on as it was
        assert sid in [s.session_id for s in c.list_sessions()]


def test_the_reported_huge_total_steps_is_refused_over_http_json(live: Live) -> None:
    """10**400 as JSON carries it, on create and on set_schedule: 400, never a 500."""
    huge = '{"cosine": {"total_steps": 1' + "0" * 400 + "}}"
    body = ('{"session_id": "huge", "algorithm": "ALGORITHM_ADAM", '
            '"tensors": [{"name": "w", "shape": [4]}], "schedule": ' + huge + "}")
    with httpx.Client(base_url=live.urls["http"], timeout=60) as h:
        r = h.post("/v2/sessions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "schedule.cosine.total_steps" in r.json()["error"], r.text
        assert len(r.text) < 1000
        h.post("/v2/sessions", json={"session_id": "huge", "algorithm": "ALGORITHM_ADAM",
                                     "tensors": [{"name": "w", "shape": [4]}]}
               ).raise_for_status()
        r = h.put("/v2/sessions/huge/schedule", content='{"schedule": ' + huge + "}",
                  headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert h.get("/v2/sessions").status_code == 200
        assert h.get("/v2/sessions/huge").status_code == 200


BAD_VALUES = [  # (hyperparameters, the key named, the range stated)
    ({"lr": 1e308}, "lr", "[0, 1e+06]"),
    ({"weight_decay": 1e300}, "weight_decay", "[0, 1e+06]"),
    ({"eps": 1e7}, "eps", "[0, 1e+06]"),
    ({"betas": (0.9, 1.0)}, "beta2", "[0, 1)"),
]


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize(("group", "key", "bound"), BAD_VALUES)
def test_a_hyperparameter_out_of_range_is_refused_everywhere_it_can_be_set(
        live: Live, wire: str, group: dict[str, Any], key: str, bound: str) -> None:
    sid = new_id(wire)
    with live.client(wire) as c:
        refused(lambda: c.create_session(SessionSpec(sid, "adam", W, groups=(group,))), key,
                bound)
        c.create_session(SessionSpec(sid, "adam", W))
        c.step(sid, GRAD)
        before = c.describe(sid)
        refused(lambda: c.set_hyperparameters(sid, 0, group), key, bound)
        refused(lambda: c.add_tensors(sid, [TensorSpec("v", (2,), 1)], group), key, bound)
        state = c.export_state(sid)
        changes = dict(group)
        if "betas" in changes:
            changes["betas"] = list(changes["betas"])
        state["param_groups"][0].update(changes)
        refused(lambda: c.import_state(sid, state), key, bound)
        assert c.describe(sid) == before


@pytest.mark.parametrize("wire", WIRES)
def test_max_grad_norm_is_bounded(live: Live, wire: str) -> None:
    with live.client(wire) as c:
        for norm in (1e308, 0.0):
            spec = SessionSpec(new_id(wire), "adam", W, max_grad_norm=norm)
            refused(partial(c.create_session, spec), "max_grad_norm", "(0, 1e+06]")


def test_max_grad_norm_inf_over_grpc_is_refused(live: Live) -> None:
    """Protobuf's double carries Inf, which JSON cannot."""
    channel, stub = live.stub()
    with channel:
        spec = pb.SessionSpec(session_id="inf-norm", algorithm=pb.ALGORITHM_ADAM,
                              tensors=[pb.TensorSpec(name="w", shape=[4])],
                              max_grad_norm=float("inf"))
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateSession(iter([pb.CreateSessionRequest(spec=spec)]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_grad_norm" in str(caught.value.details())


# ---------------------------------------------------------------------------
# a poisoned session (one an older server accepted) never breaks list or describe


def _poison(live: Live, sid: str, schedule: Schedule) -> None:
    """What an older server, which took any value, would hold: a schedule past the bounds
    (set without its checks, as such a server did)."""
    live.service.store.get(sid).opt.schedule = schedule


def _ids_everywhere(live: Live) -> dict[str, list[str]]:
    out = {}
    for wire in WIRES:
        with live.client(wire) as c:
            out[wire] = sorted(s.session_id for s in c.list_sessions())
    return out


def test_a_poisoned_schedule_is_contained_to_its_session(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with serving(tmp_path) as live, live.client("http") as c:
        for sid in ("good", "overflows", "huge"):
            c.create_session(SessionSpec(sid, "adam", W, groups=({"lr": 0.01},),
                                         schedule=COSINE))
            c.step(sid, GRAD)
            c.step(sid, GRAD)
        bad = Exponential(0.5)
        object.__setattr__(bad, "gamma", 1e300)  # 1e300 ** 2 raises OverflowError
        _poison(live, "overflows", bad)
        huge = Cosine(10)
        object.__setattr__(huge, "total_steps", 10**400)  # a float of it raises
        _poison(live, "huge", huge)
        with caplog.at_level(logging.ERROR, logger="adamserve.service"):
            assert _ids_everywhere(live) == {w: ["good", "huge", "overflows"] for w in WIRES}
            _ids_everywhere(live)
        # logged once per session, however often it is described
        logged = [r for r in caplog.records if "described without it" in r.getMessage()]
        assert sorted(r.getMessage().split(":")[0] for r in logged) == [
            "session huge", "session overflows"]
        for wire in WIRES:
            with live.client(wire) as w:
                info = w.describe("overflows")
                assert info.lr == (0.01,) and info.schedule is None  # from what is safe
                assert w.describe("good").schedule == {**COSINE, "eta_min": 0.0}


def test_a_poisoned_manifest_is_not_restored_and_breaks_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written by a server that took total_steps = 10**400 (and gamma =
    1e300): after a restart the session is refused with a warning naming it; listing
    and describing answer on every wire."""
    with serving(tmp_path) as live, live.client("http") as c:
        for sid in ("good", "poisoned", "overflows"):
            c.create_session(SessionSpec(sid, "adam", W, schedule=COSINE))
            c.step(sid, GRAD)
        huge = Cosine(10)
        object.__setattr__(huge, "total_steps", 10**400)
        _poison(live, "poisoned", huge)
        bad = Exponential(0.5)
        object.__setattr__(bad, "gamma", 1e300)
        _poison(live, "overflows", bad)
        for sid in ("good", "poisoned", "overflows"):
            c.checkpoint(sid)
    manifests = list((tmp_path / "sessions" / "poisoned").glob("ckpt-*/manifest.json"))
    assert manifests and "1" + "0" * 400 in manifests[0].read_text()  # as an old server wrote
    with caplog.at_level(logging.WARNING), serving(tmp_path) as live:
        assert _ids_everywhere(live) == {w: ["good"] for w in WIRES}
        for wire in WIRES:
            with live.client(wire) as c:
                assert c.describe("good").step == 1
                for sid in ("poisoned", "overflows"):
                    with pytest.raises(ac.NotFound):
                        c.describe(sid)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "poisoned" in warned and "schedule.total_steps" in warned, warned
    assert "overflows" in warned and "schedule.gamma" in warned, warned
    assert "0" * 100 not in warned  # the value shortened


# ---------------------------------------------------------------------------
# ids match as a whole; user strings come back shortened


def test_a_session_id_ending_in_a_newline_is_refused(live: Live) -> None:
    for bad in ("bad\n", "bad\nid", "\nbad"):
        with httpx.Client(base_url=live.urls["http"], timeout=60) as h:
            r = h.post("/v2/sessions", json={"session_id": bad, "algorithm": "ALGORITHM_ADAM",
                                             "tensors": [{"name": "w", "shape": [4]}]})
            assert r.status_code == 400 and "session id" in r.json()["error"], r.text
        channel, stub = live.stub()
        with channel, pytest.raises(grpc.RpcError) as caught:
            stub.CreateSession(iter([pb.CreateSessionRequest(spec=pb.SessionSpec(
                session_id=bad, algorithm=pb.ALGORITHM_ADAM,
                tensors=[pb.TensorSpec(name="w", shape=[4])]))]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session id" in str(caught.value.details())
    assert all("\n" not in s.session_id for s in live.client("grpc").list_sessions())


def test_a_long_tensor_name_comes_back_shortened(live: Live) -> None:
    long = "n" * 10_000
    channel, stub = live.stub()
    with channel, live.client("grpc") as c:
        # a create naming it: refused (a name has at most 1024 characters), shortened
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateSession(iter([pb.CreateSessionRequest(spec=pb.SessionSpec(
                session_id="long-name", algorithm=pb.ALGORITHM_ADAM,
                tensors=[pb.TensorSpec(name=long, shape=[4])]))]))
        details = str(caught.value.details())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(10000 characters)" in details and "1024" in details and len(details) < 300
        # a step naming it: not in the session, shortened
        c.create_session(SessionSpec("long-name", "adam", W))
        err = refused(lambda: c.step("long-name", [
            WireTensor(long, (4,), "FP32", np.ones(4, np.float32).tobytes())]),
            "is not in this session", "(10000 characters)")
        assert len(err.message) < 300
        err = refused(lambda: c.pull("long-name", [long]), "(10000 characters)")
        assert len(err.message) < 300
    with live.client("http") as h:  # HTTP refuses names past 1024 in its schema; under it:
        err = refused(lambda: h.step("long-name", [
            WireTensor("m" * 1000, (4,), "FP32", np.ones(4, np.float32).tobytes())]),
            "(1000 characters)")
        assert len(err.message) < 300


def test_an_unknown_hyperparameter_name_comes_back_shortened(live: Live) -> None:
    with httpx.Client(base_url=live.urls["http"], timeout=60) as h:
        h.post("/v2/sessions", json={"session_id": "kinds", "algorithm": "ALGORITHM_ADAM",
                                     "tensors": [{"name": "w", "shape": [4]}]}
               ).raise_for_status()
        r = h.patch("/v2/sessions/kinds/hyperparameters",
                    content=json.dumps({"group": 0, "changes": {"values": {"x" * 5000: 1.0}}}),
                    headers={"content-type": "application/json"})
        assert r.status_code == 400 and "(5000 characters)" in r.json()["error"], r.text
        assert len(r.text) < 1000
