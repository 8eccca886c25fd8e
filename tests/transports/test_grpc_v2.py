"""What v2 adds on gRPC: error reasons in ErrorInfo, ListSessions pages, typed schedules,
Durations, the round and exchange parts of a step's status, Commit's skip_params, and
the handlers registered from the RPC table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration

from adamserve.engine import schedules
from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.store import SessionStore
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.grpc.servicer import OptimizerServicer, method_handlers
from adamserve_proto import convert as shared
from adamserve_proto import rpc
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

from .test_grpc import Server, create, describe, error_info, expect, push_requests, rpc_error

W = {"w": np.zeros(4, np.float32)}
G = {"w": np.ones(4, np.float32)}


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.close()


def _push(stub: pb_grpc.OptimizerServiceStub, sid: str, worker: str, base_step: int,
          sequence: int = 1) -> pb.StepStatus:
    msgs = push_requests(sid, G)
    msgs[0].header.worker_id, msgs[0].header.sequence = worker, sequence
    msgs[0].header.base_step = base_step
    reply: pb.PushResponse = stub.Push(iter(msgs))
    return reply.status


# ---------------------------------------------------------------------------
# reasons: the status code, and ErrorInfo's reason and metadata


def test_not_found_reasons(srv: Server) -> None:
    stub = srv.stub
    err = rpc_error(lambda: describe(stub, "ghost"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(err)
    assert info.reason == "SESSION_NOT_FOUND" and info.metadata["session_id"] == "ghost"
    create(stub, "s", W)
    before = srv.fp("s")
    expect(lambda: stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(session_id="s", step=9)),
           grpc.StatusCode.NOT_FOUND, "9", reason="CHECKPOINT_NOT_FOUND")
    assert srv.fp("s") == before


def test_a_stale_push_is_failed_precondition_stale_push(srv: Server) -> None:
    stub = srv.stub
    create(stub, "sync", W, workers=pb.Workers(count=2, mode=pb.WORKER_MODE_SYNC))
    first = _push(stub, "sync", "a", 0)
    assert first.pending and not first.HasField("exchange")
    assert first.round.round_id != 0  # the round the push joined
    assert _push(stub, "sync", "b", 0).round.round_id == first.round.round_id
    assert describe(stub, "sync").step == 1
    before = srv.fp("sync")
    err = rpc_error(lambda: _push(stub, "sync", "c", 0))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(err)
    assert info.reason == "STALE_PUSH"
    assert dict(info.metadata) == {"session_id": "sync", "step": "1", "base_step": "0"}
    assert srv.fp("sync") == before


def test_a_round_past_its_straggler_timeout_is_aborted(srv: Server) -> None:
    stub = srv.stub
    create(stub, "slow", W, workers=pb.Workers(
        count=2, straggler_timeout=Duration(nanos=200_000_000),
        straggler_policy=pb.STRAGGLER_POLICY_FAIL))
    assert describe(stub, "slow").workers.straggler_timeout == Duration(nanos=200_000_000)
    before = srv.fp("slow")
    msgs = [pb.StepRequest.FromString(m.SerializeToString()) for m in push_requests("slow", G)]
    msgs[0].header.worker_id, msgs[0].header.sequence = "a", 1
    expect(lambda: list(stub.Step(iter(msgs), timeout=30)), grpc.StatusCode.ABORTED,
           "straggler timeout", reason="ROUND_ABORTED")
    assert srv.fp("slow") == before


def test_checkpoints_disabled_and_quota(tmp_path: Path) -> None:
    store = SessionStore(CpuBackend(), None)
    service = OptimizerService(store)
    service.start()
    server, port = build_grpc_server(service, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.OptimizerServiceStub(channel)
            create(stub, "s", W)
            before = store.get("s").fingerprint()
            expect(lambda: stub.Checkpoint(pb.CheckpointRequest(session_id="s")),
                   grpc.StatusCode.FAILED_PRECONDITION, "no data directory",
                   reason="CHECKPOINTS_DISABLED")
            assert store.get("s").fingerprint() == before
    finally:
        server.stop(None)
    s = Server(tmp_path)  # a store of 1 GiB
    try:
        huge = pb.SessionSpec(session_id="huge", algorithm=pb.ALGORITHM_ADAM,
                              tensors=[pb.TensorSpec(name="w", shape=[1 << 30])])
        expect(lambda: s.stub.CreateSession(iter([pb.CreateSessionRequest(spec=huge)])),
               grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes", reason="QUOTA_EXCEEDED")
        assert not s.store.all()
    finally:
        s.close()


def test_unauthenticated_has_its_reason(tmp_path: Path) -> None:
    s = Server(tmp_path, token="t0ken")
    try:
        err = rpc_error(lambda: s.stub.ListSessions(pb.ListSessionsRequest()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(err).reason == "UNAUTHENTICATED"
    finally:
        s.close()


# ---------------------------------------------------------------------------
# ListSessions: pages of sessions ordered by id


def _ids(reply: pb.ListSessionsResponse) -> list[str]:
    return [s.session_id for s in reply.sessions]


def test_list_sessions_pages(srv: Server) -> None:
    stub = srv.stub
    names = [f"p{i:03d}" for i in range(105)]
    for name in reversed(names):
        create(stub, name, W)
    everything = stub.ListSessions(pb.ListSessionsRequest())
    assert _ids(everything) == names[:100] and everything.next_page_token  # 0 means 100
    rest = stub.ListSessions(pb.ListSessionsRequest(page_token=everything.next_page_token))
    assert _ids(rest) == names[100:] and rest.next_page_token == ""
    assert _ids(stub.ListSessions(pb.ListSessionsRequest(page_size=5000))) == names  # max 1000
    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListSessions(pb.ListSessionsRequest(page_size=40, page_token=token))
        assert len(page.sessions) <= 40
        seen += _ids(page)
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    # a page's token still works when its last session is gone, and skips nothing new
    first = stub.ListSessions(pb.ListSessionsRequest(page_size=2))
    assert _ids(first) == ["p000", "p001"]
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="p001"))
    create(stub, "p0015", W)
    after = stub.ListSessions(pb.ListSessionsRequest(page_size=2,
                                                     page_token=first.next_page_token))
    assert _ids(after) == ["p0015", "p002"]
    for token in ("garbage!", "AAAA", first.next_page_token[:-3]):
        expect(lambda t=token: stub.ListSessions(pb.ListSessionsRequest(page_token=t)),
               grpc.StatusCode.INVALID_ARGUMENT, "page_token", "next_page_token")
    expect(lambda: stub.ListSessions(pb.ListSessionsRequest(page_size=-1)),
           grpc.StatusCode.INVALID_ARGUMENT, "page_size", "-1")


# ---------------------------------------------------------------------------
# typed schedules and Durations

FULL: dict[str, pb.Schedule] = {
    "constant": pb.Schedule(constant=pb.ConstantSchedule(factor=0.5)),
    "linear": pb.Schedule(linear=pb.LinearSchedule(start_factor=0.1, end_factor=0.9,
                                                   total_steps=10)),
    "cosine": pb.Schedule(cosine=pb.CosineSchedule(total_steps=100, eta_min=1e-5)),
    "inverse_sqrt": pb.Schedule(inverse_sqrt=pb.InverseSqrtSchedule(warmup_steps=4)),
    "exponential": pb.Schedule(exponential=pb.ExponentialSchedule(gamma=0.9)),
    "step": pb.Schedule(step=pb.StepSchedule(step_size=3, gamma=0.5)),
    "one_cycle": pb.Schedule(one_cycle=pb.OneCycleSchedule(
        total_steps=50, max_lr=0.01, pct_start=0.25, anneal_strategy=pb.ANNEAL_STRATEGY_LINEAR,
        div_factor=10, final_div_factor=100, three_phase=True, cycle_momentum=False,
        base_momentum=0.8, max_momentum=0.9)),
    "join": pb.Schedule(join=pb.JoinSchedule(
        schedules=[pb.Schedule(linear=pb.LinearSchedule(start_factor=0, end_factor=1,
                                                        total_steps=5)),
                   pb.Schedule(cosine=pb.CosineSchedule(total_steps=20, eta_min=0))],
        milestones=[5])),
}


@pytest.mark.parametrize("kind", list(FULL))
def test_typed_schedule_round_trips(srv: Server, kind: str) -> None:
    stub = srv.stub
    sent = FULL[kind]
    info = create(stub, kind, W, schedule=sent)
    assert info.schedule == sent
    # what the engine computes from it is what the session reports
    engine = schedules.schedule_from_dict(shared.schedule_dict(sent))
    assert info.lr[0] == pytest.approx(engine.lr(0, info.groups[0].values["lr"]))
    stub.SetSchedule(pb.SetScheduleRequest(session_id=kind))
    assert not describe(stub, kind).HasField("schedule")
    again = stub.SetSchedule(pb.SetScheduleRequest(session_id=kind, schedule=sent)).session
    assert again.schedule == sent


def test_absent_schedule_fields_take_the_protos_defaults(srv: Server) -> None:
    stub = srv.stub
    info = create(stub, "defaults", W, schedule=pb.Schedule(one_cycle=pb.OneCycleSchedule(
        total_steps=10)))
    assert info.schedule == pb.Schedule(one_cycle=pb.OneCycleSchedule(
        total_steps=10, pct_start=0.3, anneal_strategy=pb.ANNEAL_STRATEGY_COS, div_factor=25,
        final_div_factor=1e4, three_phase=False, cycle_momentum=True, base_momentum=0.85,
        max_momentum=0.95))  # max_lr stays absent: the group's lr
    for sent, want in [
        (pb.LinearSchedule(total_steps=4), pb.LinearSchedule(end_factor=1, total_steps=4)),
        (pb.StepSchedule(step_size=2), pb.StepSchedule(step_size=2, gamma=0.1)),
    ]:
        reply = stub.SetSchedule(pb.SetScheduleRequest(session_id="defaults", schedule=(
            pb.Schedule(linear=sent) if isinstance(sent, pb.LinearSchedule)
            else pb.Schedule(step=sent)))).session
        kind = reply.schedule.WhichOneof("kind")
        assert getattr(reply.schedule, str(kind)) == want
    reply = stub.SetSchedule(pb.SetScheduleRequest(
        session_id="defaults", schedule=pb.Schedule(constant=pb.ConstantSchedule()))).session
    assert reply.schedule.constant.HasField("factor") and reply.schedule.constant.factor == 1


def test_every_engine_schedule_converts_both_ways() -> None:
    engine = [schedules.Constant(0.25), schedules.Linear(0.0, 1.0, 8), schedules.Cosine(9, 0.1),
              schedules.InverseSqrt(3), schedules.Exponential(0.5), schedules.Step(2, 0.3),
              schedules.OneCycle(20), schedules.OneCycle(20, max_lr=0.1,
                                                         anneal_strategy="linear"),
              schedules.warmup(4, schedules.Cosine(10))]
    for s in engine:
        d = s.to_dict()
        # every key comes back, an absent one as the proto's default (max_lr None)
        assert shared.schedule_dict(shared.schedule_message(d)) == d, d
        assert schedules.schedule_from_dict(shared.schedule_dict(
            shared.schedule_message(d))) == s


def test_durations_round_trip(srv: Server) -> None:
    timeout = Duration(seconds=2, nanos=250_000_000)
    info = create(srv.stub, "dur", W, workers=pb.Workers(
        count=3, straggler_timeout=timeout, straggler_policy=pb.STRAGGLER_POLICY_APPLY))
    assert info.workers.straggler_timeout == timeout
    assert info.workers.straggler_policy == pb.STRAGGLER_POLICY_APPLY
    assert not create(srv.stub, "nodur", W).workers.HasField("straggler_timeout")


# ---------------------------------------------------------------------------
# exchange sessions: the status's exchange sums, Commit with and without parameters


def test_commit_returns_params_unless_skip_params(srv: Server) -> None:
    stub = srv.stub
    for sid in ("ex1", "ex2"):
        create(stub, sid, W, workers=pb.Workers(count=1, exchange=True))
    for sid, skip in (("ex1", True), ("ex2", False)):
        status = _push(stub, sid, "a", 0)
        assert status.pending and list(status.exchange.grad_sumsq) == [4.0]
        before = srv.fp(sid)
        out = list(stub.Commit(pb.CommitRequest(
            session_id=sid, step=1, tensor_sumsq=[4.0], total_sumsq=4.0,
            round_id=status.round.round_id, skip_params=skip, return_datatype="FP64")))
        assert out[0].WhichOneof("kind") == "status" and out[0].status.step == 1
        assert srv.fp(sid) != before
        params = [m.param for m in out[1:]]
        assert all(m.WhichOneof("kind") == "param" for m in out[1:])
        if skip:
            assert params == []
        else:
            assert [(p.name, p.datatype, len(p.data)) for p in params] == [("w", "FP64", 32)]
    expect(lambda: list(stub.Commit(pb.CommitRequest(
        session_id="ex1", step=2, tensor_sumsq=[1.0], total_sumsq=1.0,
        return_datatype="NONE"))), grpc.StatusCode.INVALID_ARGUMENT, "return_datatype",
        "'NONE'")


# ---------------------------------------------------------------------------
# the RPC table


def test_every_rpc_of_the_table_has_its_handler(srv: Server) -> None:
    handlers = method_handlers(srv.service)
    assert set(handlers) == set(rpc.RPCS)
    for name, row in rpc.RPCS.items():
        handler: Any = handlers[name]
        assert (handler.request_streaming, handler.response_streaming) == (
            row.request_streaming, row.response_streaming), name
        assert callable(getattr(OptimizerServicer, name)), name
    # every RPC answers on its path (an empty request: a refusal, never UNIMPLEMENTED)
    for name, row in rpc.RPCS.items():
        method = getattr(srv.channel, row.kind)(row.path, request_serializer=lambda m: m,
                                                response_deserializer=row.response_type.FromString)
        request: Any = iter([b""]) if row.request_streaming else b""
        try:
            reply = method(request, timeout=10)
            if row.response_streaming:
                list(reply)
        except grpc.RpcError as err:
            assert err.code() != grpc.StatusCode.UNIMPLEMENTED, name
