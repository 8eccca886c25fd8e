"""Step modes: full duplex (chunks applied as they arrive) and the one-message StepUnary."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec
from adamserve_proto.v2 import optimizer_pb2 as pb

from .test_grpc import Server, algorithm_value, error_info

SHAPES = {"big": (3, 500_000), "small": (7,)}  # "big" spans two 4 MiB chunks
PER = 1 << 20  # elements per chunk


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.close()


def _create(srv: Server, sid: str, algorithm: str = "adam", skip_nonfinite: bool = False,
            **extra: float) -> None:
    spec = pb.SessionSpec(session_id=sid, algorithm=algorithm_value(algorithm),
                          skip_nonfinite=skip_nonfinite,
                          tensors=[pb.TensorSpec(name=k, shape=s) for k, s in SHAPES.items()],
                          groups=[pb.Group(values={"lr": 1e-2, **extra})])
    srv.stub.CreateSession(iter([pb.CreateSessionRequest(spec=spec)]))


def _chunks(grads: dict[str, np.ndarray]) -> list[pb.StepRequest]:
    out = []
    for name, g in grads.items():
        flat = g.ravel()
        for off in range(0, flat.size, PER):
            out.append(pb.StepRequest(chunk=pb.TensorChunk(
                name=name, shape=list(g.shape), datatype="FP32", offset=off,
                data=flat[off:off + PER].tobytes())))
    return out


def _push(msgs: list[pb.StepRequest]) -> list[pb.PushRequest]:
    return [pb.PushRequest(chunk=m.chunk) for m in msgs]


def test_duplex_step_streams_while_receiving_and_equals_a_step(srv: Server) -> None:
    _create(srv, "dup")
    rng = np.random.default_rng(0)
    layout = Layout(tuple(TensorSpec(k, s) for k, s in SHAPES.items()))
    local = FlatOptimizer("adam", layout, [{"lr": 1e-2}], skip_nonfinite=False)
    for step in range(3):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        first_reply = threading.Event()
        sent_before_reply: list[int] = []

        def requests(grads: dict[str, np.ndarray] = grads, ev: threading.Event = first_reply,
                     log: list[int] = sent_before_reply) -> Iterator[pb.StepRequest]:
            yield pb.StepRequest(header=pb.StepHeader(session_id="dup", apply_as_received=True))
            chunks = _chunks(grads)
            for k, c in enumerate(chunks):
                if k == len(chunks) - 1:
                    # hold the last chunk back until updated parameters came back
                    ev.wait(20)
                    log.append(int(ev.is_set()))
                yield c

        params: dict[str, list[bytes]] = {k: [] for k in SHAPES}
        status = None
        for msg in srv.stub.Step(requests()):
            if msg.HasField("param"):
                first_reply.set()
                params[msg.param.name].append(msg.param.data)
            else:
                status = msg.status
        assert sent_before_reply == [1], "no parameters came back before the last chunk was sent"
        assert status is not None and status.step == step + 1 and not status.skipped
        local.grad[:] = np.concatenate([grads[k].ravel() for k in SHAPES])
        local.step()
        got = np.concatenate([np.frombuffer(b"".join(params[k]), "<f4") for k in SHAPES])
        np.testing.assert_array_equal(got, local.param)


@pytest.mark.parametrize("kind", ["lamb", "nonfinite-check", "clipping"])
def test_duplex_refused_where_the_step_needs_the_whole_gradient(srv: Server, kind: str) -> None:
    if kind == "lamb":
        _create(srv, kind, algorithm="lamb")
    elif kind == "nonfinite-check":
        _create(srv, kind, skip_nonfinite=True)
    else:
        spec = pb.SessionSpec(session_id=kind, algorithm=pb.ALGORITHM_ADAM, skip_nonfinite=False,
                              max_grad_norm=1.0,
                              tensors=[pb.TensorSpec(name=k, shape=s) for k, s in SHAPES.items()])
        srv.stub.CreateSession(iter([pb.CreateSessionRequest(spec=spec)]))
    before = srv.fp(kind)
    g = {"small": np.ones(7, np.float32)}
    reqs = [pb.StepRequest(header=pb.StepHeader(session_id=kind, apply_as_received=True)),
            *_chunks(g)]
    with pytest.raises(grpc.RpcError) as err:
        list(srv.stub.Step(iter(reqs)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot apply gradients as they arrive" in (err.value.details() or "")
    assert error_info(err.value).reason == "NOT_STREAMABLE"
    assert srv.fp(kind) == before


def test_step_unary_equals_the_stream_and_refuses_large_sessions(srv: Server) -> None:
    shapes = {"w": (10, 10), "b": (10,)}
    for sid in ("unary", "stream"):
        spec = pb.SessionSpec(session_id=sid, algorithm=pb.ALGORITHM_NADAM,
                              tensors=[pb.TensorSpec(name=k, shape=s) for k, s in shapes.items()])
        srv.stub.CreateSession(iter([pb.CreateSessionRequest(spec=spec)]))
    rng = np.random.default_rng(3)
    for _ in range(3):
        grads = [pb.TensorChunk(name=k, shape=list(s), datatype="FP32",
                                data=rng.standard_normal(s).astype(np.float32).tobytes())
                 for k, s in shapes.items()]
        reply = srv.stub.StepUnary(pb.StepUnaryRequest(
            header=pb.StepHeader(session_id="unary"), gradients=grads))
        streamed = list(srv.stub.Step(iter(
            [pb.StepRequest(header=pb.StepHeader(session_id="stream"))]
            + [pb.StepRequest(chunk=g) for g in grads])))
        assert reply.status.step == streamed[0].status.step
        assert [p.data for p in reply.params] == [m.param.data for m in streamed[1:]]
    _create(srv, "big")  # 1.5M parameters: 6 MB as FP32
    before = srv.fp("big")
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.StepUnary(pb.StepUnaryRequest(header=pb.StepHeader(session_id="big")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "use the Step stream" in (err.value.details() or "")
    assert error_info(err.value).reason == "UNARY_TOO_LARGE"  # what the client falls back on
    assert srv.fp("big") == before


def test_a_resent_step_is_acknowledged_not_applied(srv: Server) -> None:
    _create(srv, "once")
    g = {"small": np.ones(7, np.float32)}
    header = pb.StepHeader(session_id="once", worker_id="w0", sequence=1)
    first = list(srv.stub.Step(iter([pb.StepRequest(header=header), *_chunks(g)])))
    after_first = srv.fp("once")
    again = list(srv.stub.Step(iter([pb.StepRequest(header=header), *_chunks(g)])))
    pushed = srv.stub.Push(iter([pb.PushRequest(header=header), *_push(_chunks(g))])).status
    assert not first[0].status.duplicate and again[0].status.duplicate and pushed.duplicate
    assert again[0].status.step == first[0].status.step == 1
    assert [m.param.data for m in again[1:]] == [m.param.data for m in first[1:]]
    assert srv.fp("once") == after_first
    with pytest.raises(grpc.RpcError) as err:  # a worker id without a sequence
        srv.stub.Push(iter([pb.PushRequest(header=pb.StepHeader(session_id="once",
                                                                 worker_id="w0")),
                            *_push(_chunks(g))]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
