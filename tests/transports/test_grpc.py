"""The gRPC transport end to end: a real server on 127.0.0.1, a real channel.

Numbers are checked against a local FlatOptimizer fed the same data: with FP32 on
the wire and float32 state both run the same kernel on the same bits, so the
parameters must be equal exactly. Every refused request must leave the session's
fingerprint unchanged.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import ErrorInfo
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec
from adamserve.errors import REASONS
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.grpc.servicer import MAX_SEND_BYTES
from adamserve.transports.state_codec import decode_state
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

MiB = 1 << 20
SERVICE = "adamserve_proto.v2.OptimizerService"
CAP = 1 << 30  # the store's max_state_bytes
TOKEN = "s3cret-token"
WIRE = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2"),
        "BF16": np.dtype("<u2")}

Arrays = dict[str, np.ndarray]


# ---------------------------------------------------------------------------
# fixtures


class Server:
    def __init__(self, tmp: Path, token: str | None = None, start: bool = True) -> None:
        self.store = SessionStore(CpuBackend(), CheckpointStore(tmp), Limits(max_state_bytes=CAP))
        self.service = OptimizerService(self.store)
        if start:
            self.service.start()
        self.server, self.port = build_grpc_server(self.service, port=0, token=token)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.OptimizerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)

    def fp(self, sid: str) -> str:
        return self.store.get(sid).fingerprint()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("grpc"))
    yield s
    s.close()


@pytest.fixture
def stub(srv: Server) -> pb_grpc.OptimizerServiceStub:
    return srv.stub


_ids = iter(range(1_000_000))


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{next(_ids)}"


# ---------------------------------------------------------------------------
# wire helpers


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded by torch (the reference)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode(x: np.ndarray, datatype: str) -> bytes:
    if datatype == "BF16":
        return to_bf16_bits(x).tobytes()
    return np.ascontiguousarray(x, dtype=WIRE[datatype]).tobytes()


def tensor_chunks(name: str, x: np.ndarray, datatype: str = "FP32",
                  per_chunk: int | None = None) -> list[pb.TensorChunk]:
    flat = np.ascontiguousarray(x).reshape(-1)
    per = per_chunk or max(1, flat.size)
    out = []
    for lo in range(0, max(flat.size, 1), per):
        out.append(pb.TensorChunk(name=name, shape=list(x.shape), datatype=datatype, offset=lo,
                                  data=encode(flat[lo:lo + per], datatype)))
    return out


def assemble(chunks: Iterable[pb.TensorChunk]) -> Arrays:
    """Reassemble returned chunks (checking their order) and decode them to float arrays."""
    parts: dict[str, list[bytes]] = {}
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    seen: dict[str, int] = {}
    for c in chunks:
        itemsize = WIRE[c.datatype].itemsize
        assert c.offset == seen.get(c.name, 0), f"{c.name}: chunk out of order"
        seen[c.name] = c.offset + len(c.data) // itemsize
        parts.setdefault(c.name, []).append(c.data)
        meta[c.name] = (tuple(c.shape), c.datatype)
    out = {}
    for name, ps in parts.items():
        shape, dt = meta[name]
        raw = np.frombuffer(b"".join(ps), dtype=WIRE[dt])
        arr = from_bf16_bits(raw) if dt == "BF16" else raw
        out[name] = arr.reshape(shape)
    return out


def algorithm_value(name: str) -> pb.Algorithm.ValueType:
    """The Algorithm enum value of a domain name ("adamw" -> ALGORITHM_ADAMW)."""
    return pb.Algorithm.Value(f"ALGORITHM_{name.upper()}")


def create(stub: pb_grpc.OptimizerServiceStub, sid: str, init: Arrays, algorithm: str = "adam",
           groups: list[pb.Group] | None = None, datatype: str = "FP32",
           per_chunk: int | None = None, **spec: Any) -> pb.Session:
    msgs = [pb.CreateSessionRequest(spec=pb.SessionSpec(
        session_id=sid, algorithm=algorithm_value(algorithm), groups=groups or [],
        tensors=[pb.TensorSpec(name=n, shape=list(a.shape)) for n, a in init.items()], **spec))]
    for n, a in init.items():
        msgs += [pb.CreateSessionRequest(initial=c)
                 for c in tensor_chunks(n, a, datatype, per_chunk)]
    reply: pb.CreateSessionResponse = stub.CreateSession(iter(msgs))
    return reply.session


def describe(stub: pb_grpc.OptimizerServiceStub, sid: str) -> pb.Session:
    reply: pb.GetSessionResponse = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    return reply.session


def step_requests(sid: str, grads: Arrays, datatype: str = "FP32", return_datatype: str = "FP32",
                  per_chunk: int | None = None, require_all: bool = False) -> list[pb.StepRequest]:
    msgs = [pb.StepRequest(header=pb.StepHeader(session_id=sid, return_datatype=return_datatype,
                                                require_all=require_all))]
    for n, g in grads.items():
        msgs += [pb.StepRequest(chunk=c) for c in tensor_chunks(n, g, datatype, per_chunk)]
    return msgs


def push_requests(sid: str, grads: Arrays, **kw: Any) -> list[pb.PushRequest]:
    """step_requests as PushRequests (the same oneof, field for field)."""
    return [pb.PushRequest.FromString(m.SerializeToString())
            for m in step_requests(sid, grads, **kw)]


def step(stub: pb_grpc.OptimizerServiceStub, sid: str, grads: Arrays, **kw: Any) -> tuple[
        pb.StepStatus, Arrays, list[pb.StepResponse]]:
    responses = list(stub.Step(iter(step_requests(sid, grads, **kw))))
    assert responses[0].WhichOneof("kind") == "status"
    assert all(r.WhichOneof("kind") == "param" for r in responses[1:])
    return responses[0].status, assemble(r.param for r in responses[1:]), responses


def pull(stub: pb_grpc.OptimizerServiceStub, sid: str, names: list[str] | None = None,
         datatype: str = "FP32") -> Arrays:
    return assemble(r.chunk for r in stub.Pull(pb.PullRequest(session_id=sid, names=names or [],
                                                               datatype=datatype)))


def local(init: Arrays, algorithm: str = "adam", groups: list[dict[str, Any]] | None = None,
          **kw: Any) -> FlatOptimizer:
    layout = Layout(tuple(TensorSpec(n, a.shape) for n, a in init.items()))
    flat = np.concatenate([a.reshape(-1) for a in init.values()]).astype(np.float32)
    return FlatOptimizer(algorithm, layout, groups or [{}], backend=CpuBackend(), params=flat,
                         **kw)


def local_step(opt: FlatOptimizer, grads: Arrays) -> Arrays:
    active = np.zeros(len(opt.layout), dtype=bool)
    for n, g in grads.items():
        i = opt.layout.index(n)
        opt.grad[opt.layout.span(i)] = g.reshape(-1)
        active[i] = True
    opt.step(None if active.all() else active)
    return local_params(opt)


def local_params(opt: FlatOptimizer) -> Arrays:
    return {t.name: np.array(opt.param[opt.layout.span(i)]).reshape(t.shape)
            for i, t in enumerate(opt.layout.tensors)}


def assert_same(got: Arrays, want: Arrays) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].shape == want[n].shape, n
        np.testing.assert_array_equal(got[n], want[n], err_msg=n, strict=False)
        assert got[n].tobytes() == np.ascontiguousarray(want[n], dtype=got[n].dtype).tobytes(), n


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def small_model(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"w": rand(rng, 8, 16), "b": rand(rng, 16), "s": rand(rng)}


def small_grads(rng: np.random.Generator) -> Arrays:
    return {"w": rand(rng, 8, 16), "b": rand(rng, 16), "s": rand(rng)}


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# The reasons each status code may carry (the table at the top of optimizer.proto).
REASONS_BY_CODE: dict[grpc.StatusCode, set[str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: {"INVALID_ARGUMENT", "UNARY_TOO_LARGE",
                                       "SHARED_MEMORY_OUT_OF_RANGE"},
    grpc.StatusCode.NOT_FOUND: {"SESSION_NOT_FOUND", "CHECKPOINT_NOT_FOUND",
                                "SHARED_MEMORY_NOT_FOUND"},
    grpc.StatusCode.ALREADY_EXISTS: {"SESSION_EXISTS", "SHARED_MEMORY_EXISTS"},
    grpc.StatusCode.FAILED_PRECONDITION: {
        "STALE_PUSH", "PUSH_AHEAD", "ROUND_OPEN", "STEP_STAGED", "NO_STAGED_STEP",
        "COMMIT_OUT_OF_ORDER", "NOT_STREAMABLE", "DUPLICATE_WORKER_PUSH", "LAYOUT_CHANGED",
        "WORKERS_CHANGED",
        "CHECKPOINTS_DISABLED", "SHARED_MEMORY_DISABLED", "SHARED_MEMORY_FORBIDDEN",
        "FAILED_PRECONDITION"},
    grpc.StatusCode.RESOURCE_EXHAUSTED: {"QUOTA_EXCEEDED", "DEVICE_OUT_OF_MEMORY", "RATE_LIMITED",
                                         "TOO_MANY_STREAMS"},
    grpc.StatusCode.ABORTED: {"ROUND_ABORTED"},
    grpc.StatusCode.DEADLINE_EXCEEDED: {"WAIT_TIMEOUT"},
    grpc.StatusCode.UNAUTHENTICATED: {"UNAUTHENTICATED"},
    grpc.StatusCode.PERMISSION_DENIED: {"PERMISSION_DENIED"},
    grpc.StatusCode.UNAVAILABLE: {"DATA_DIR_UNAVAILABLE"},
    grpc.StatusCode.INTERNAL: {"INTERNAL"},
}


def _proto_reasons() -> dict[str, set[str]]:
    """The reasons of each status code in the table at the top of optimizer.proto."""
    text = (Path(pb.__file__).with_name("optimizer.proto")).read_text()
    block = text[text.index("//   INVALID_ARGUMENT"):text.index("// Clients branch")]
    rows: dict[str, str] = {}
    code = ""
    for line in block.splitlines():
        row = re.match(r"//   ([A-Z_]+)\s+(.*)", line)
        if row:
            code = row.group(1)
            rows[code] = row.group(2)
        else:
            rows[code] += " " + line.removeprefix("//").strip()
    return {code: set(re.findall(r"\b[A-Z][A-Z_]+\b", re.sub(r"\([^)]*\)", "", reasons)))
            for code, reasons in rows.items()}


def test_the_reason_table_is_the_protos_and_the_servers() -> None:
    assert _proto_reasons() == {code.name: reasons for code, reasons in REASONS_BY_CODE.items()}
    assert set().union(*REASONS_BY_CODE.values()) == set(REASONS)


def error_info(err: grpc.RpcError) -> ErrorInfo:
    """The one google.rpc.ErrorInfo in an error's status details."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin"
    assert status.code == err.code().value[0] and status.message == err.details()
    (detail,) = status.details
    info = ErrorInfo()
    assert detail.Unpack(info)
    assert info.domain == "adamserve"
    return info


def expect(fn: Callable[[], Any], code: grpc.StatusCode, *needles: str,
           reason: str | None = None) -> str:
    err = rpc_error(fn)
    assert err.code() == code, (err.code(), err.details())
    details = err.details() or ""
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    info = error_info(err)
    if reason is not None:
        assert info.reason == reason, (info.reason, details)
    else:
        assert info.reason in REASONS_BY_CODE[code], (code, info.reason, details)
    return details


# ---------------------------------------------------------------------------
# numerics


def test_create_then_three_steps_equal_local_fp32(stub: pb_grpc.OptimizerServiceStub) -> None:
    sid = new_id()
    init = small_model()
    groups = [pb.Group(values={"lr": 0.01, "beta1": 0.8, "weight_decay": 0.1},
                       flags={"amsgrad": True})]
    info = create(stub, sid, init, groups=groups)
    assert info.session_id == sid and info.step == 0
    assert [t.name for t in info.tensors] == ["w", "b", "s"]
    assert list(info.tensors[0].shape) == [8, 16] and list(info.tensors[2].shape) == []
    assert info.groups[0].values["lr"] == 0.01 and info.groups[0].values["beta1"] == 0.8
    assert info.groups[0].flags["amsgrad"] is True
    assert_same(pull(stub, sid), init)

    opt = local(init, groups=[{"lr": 0.01, "beta1": 0.8, "weight_decay": 0.1, "amsgrad": True}])
    rng = np.random.default_rng(1)
    for k in range(1, 4):
        grads = small_grads(rng)
        status, params, _ = step(stub, sid, grads)
        assert status.step == k and not status.skipped and not status.nonfinite
        assert status.HasField("grad_norm") and status.grad_norm > 0
        assert_same(params, local_step(opt, grads))
    assert_same(pull(stub, sid), local_params(opt))
    assert describe(stub, sid).step == 3


def test_partial_step_push_and_pull_datatypes(stub: pb_grpc.OptimizerServiceStub) -> None:
    sid = new_id()
    init = small_model(2)
    create(stub, sid, init, algorithm="adamw")
    opt = local(init, algorithm="adamw")
    rng = np.random.default_rng(3)
    # Push: a subset of tensors, nothing comes back
    grads = {"w": rand(rng, 8, 16)}
    status = stub.Push(iter(push_requests(sid, grads, return_datatype=""))).status
    assert status.step == 1 and not status.skipped
    want = local_step(opt, grads)
    assert_same(pull(stub, sid), want)
    # Pull by name, in the order asked, and in other datatypes
    got = stub.Pull(pb.PullRequest(session_id=sid, names=["s", "w"]))
    assert [r.chunk.name for r in got] == ["s", "w"]
    assert_same(pull(stub, sid, ["b"], "FP64"), {"b": want["b"].astype(np.float64)})
    assert_same(pull(stub, sid, ["w"], "FP16"), {"w": want["w"].astype(np.float16)})
    # the default return datatype is FP32
    _, params, _ = step(stub, sid, small_grads(rng), return_datatype="")
    assert all(p.dtype == np.float32 for p in params.values())


def test_bf16_wire_grads_and_params(stub: pb_grpc.OptimizerServiceStub) -> None:
    sid = new_id()
    init = small_model(4)
    create(stub, sid, init)
    opt = local(init)
    rng = np.random.default_rng(5)
    for _ in range(2):
        grads = small_grads(rng)
        status, params, _ = step(stub, sid, grads, datatype="BF16", return_datatype="BF16")
        assert not status.skipped
        # the server saw the bf16-rounded gradients, kept fp32 masters, returned bf16
        rounded = {n: from_bf16_bits(to_bf16_bits(g)).reshape(g.shape) for n, g in grads.items()}
        want = local_step(opt, rounded)
        for n in want:
            assert params[n].tobytes() == from_bf16_bits(to_bf16_bits(want[n])).tobytes(), n
    assert_same(pull(stub, sid), local_params(opt))  # the fp32 masters


def test_tensor_larger_than_a_message_round_trips_in_chunks(srv: Server) -> None:
    stub = srv.stub
    sid = new_id("big")
    rng = np.random.default_rng(6)
    init = {"big": rand(rng, 3_000_000), "small": rand(rng, 5)}
    create(stub, sid, init, per_chunk=700_000)
    opt = local(init)
    grads = {"big": rand(rng, 3_000_000), "small": rand(rng, 5)}
    bytes_in = REGISTRY.get_sample_value("adamserve_bytes_in_total", {"transport": "grpc"}) or 0
    status, params, responses = step(stub, sid, grads, per_chunk=1_000_000)
    assert not status.skipped
    after = REGISTRY.get_sample_value("adamserve_bytes_in_total", {"transport": "grpc"}) or 0
    assert after - bytes_in == 4 * 3_000_005
    assert max(r.ByteSize() for r in responses) <= MAX_SEND_BYTES
    assert sum(1 for r in responses if r.param.name == "big") >= 3
    assert_same(params, local_step(opt, grads))
    pulled = list(stub.Pull(pb.PullRequest(session_id=sid, names=["big"])))
    assert len(pulled) >= 3 and max(r.ByteSize() for r in pulled) <= MAX_SEND_BYTES
    assert_same(assemble(r.chunk for r in pulled), {"big": local_params(opt)["big"]})
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))


def test_set_hyperparameters_mid_run_equals_local(stub: pb_grpc.OptimizerServiceStub) -> None:
    sid = new_id()
    init = small_model(7)
    create(stub, sid, init)
    opt = local(init)
    rng = np.random.default_rng(8)
    for _ in range(2):
        grads = small_grads(rng)
        _, params, _ = step(stub, sid, grads)
        assert_same(params, local_step(opt, grads))
    info = stub.SetHyperparameters(pb.SetHyperparametersRequest(
        session_id=sid, group=0, changes=pb.Group(values={"lr": 0.05}, flags={"maximize": True})
    )).session
    assert info.groups[0].values["lr"] == 0.05 and info.lr[0] == 0.05
    assert info.groups[0].flags["maximize"] is True
    opt.set_hyperparameters(0, {"lr": 0.05, "maximize": True})
    grads = small_grads(rng)
    _, params, _ = step(stub, sid, grads)
    assert_same(params, local_step(opt, grads))


def add_requests(sid: str, specs: list[tuple[str, tuple[int, ...], int]],
                 init: Arrays | None = None, new_group: pb.Group | None = None,
                 per_chunk: int | None = None) -> list[pb.AddTensorsRequest]:
    spec = pb.AddTensorsSpec(session_id=sid, tensors=[
        pb.TensorSpec(name=n, shape=list(shape), group=g) for n, shape, g in specs])
    if new_group is not None:
        spec.new_group.CopyFrom(new_group)
    msgs = [pb.AddTensorsRequest(spec=spec)]
    for n, a in (init or {}).items():
        msgs += [pb.AddTensorsRequest(initial=c) for c in tensor_chunks(n, a, "FP32", per_chunk)]
    return msgs


def test_add_tensors_mid_run_equals_local(srv: Server) -> None:
    """A new tensor and group mid-run (and one joining an old group), as FlatOptimizer does."""
    stub = srv.stub
    sid = new_id("grow")
    init = small_model(30)
    create(stub, sid, init)
    opt = local(init)
    rng = np.random.default_rng(31)
    for _ in range(2):
        grads = small_grads(rng)
        _, params, _ = step(stub, sid, grads)
        assert_same(params, local_step(opt, grads))
    ck = stub.Checkpoint(pb.CheckpointRequest(session_id=sid)).checkpoint
    head = rand(rng, 3, 5)
    info = stub.AddTensors(iter(add_requests(
        sid, [("head", (3, 5), 1), ("bias", (4,), 1)], {"head": head},
        pb.Group(values={"lr": 0.05, "beta1": 0.7}, flags={"amsgrad": True}), per_chunk=4))
    ).session
    assert [(t.name, t.group) for t in info.tensors] == [
        ("w", 0), ("b", 0), ("s", 0), ("head", 1), ("bias", 1)]
    assert info.step == 2 and len(info.groups) == 2 and info.lr[1] == 0.05
    assert info.groups[1].values["beta1"] == 0.7 and info.groups[1].flags["amsgrad"]
    assert info.groups[0].values["lr"] == 1e-3 and not info.groups[0].flags["amsgrad"]
    assert info.checkpointed_step == ck.step == 2
    assert (srv.store.checkpoints.data_dir / ck.path).is_dir()  # relative to the data dir
    opt.add_tensors([TensorSpec("head", (3, 5), 1), TensorSpec("bias", (4,), 1)],
                    np.concatenate([head.reshape(-1), np.zeros(4, np.float32)]),
                    {"lr": 0.05, "beta1": 0.7, "amsgrad": True})
    assert_same(pull(stub, sid), local_params(opt))
    # no new group: a tensor joins group 0 (no initial values: zeros)
    info = stub.AddTensors(iter(add_requests(sid, [("extra", (2, 2), 0)]))).session
    assert [t.name for t in info.tensors][-1] == "extra" and len(info.groups) == 2
    opt.add_tensors([TensorSpec("extra", (2, 2), 0)], np.zeros(4, np.float32))
    for k in range(3):
        grads = small_grads(rng)
        grads.update(head=rand(rng, 3, 5), bias=rand(rng, 4), extra=rand(rng, 2, 2))
        if k == 1:  # only the new tensors: the old ones keep their step counts
            grads = {n: grads[n] for n in ("head", "bias")}
        _, params, _ = step(stub, sid, grads)
        assert_same(params, local_step(opt, grads))
    state = decode_state(b"".join(c.data for c in stub.ExportState(
        pb.ExportStateRequest(session_id=sid))))
    assert [state["state"][i]["step"] for i in range(6)] == [4, 4, 4, 3, 3, 2]
    assert "max_exp_avg_sq" in state["state"][3]


def _export_import_round_trip(srv: Server, init: Arrays) -> None:
    stub = srv.stub
    a, b = new_id("a"), new_id("b")
    create(stub, a, init, algorithm="nadam")
    rng = np.random.default_rng(10)
    for _ in range(3):
        step(stub, a, {n: rand(rng, *x.shape) for n, x in init.items()})
    blob = b"".join(c.data for c in stub.ExportState(pb.ExportStateRequest(session_id=a)))
    assert blob[8:9] == b"{"  # a safetensors header
    # b starts at a's parameters; importing a's state makes the two identical
    create(stub, b, pull(stub, a), algorithm="nadam")
    half = len(blob) // 2
    info = stub.ImportState(iter([pb.ImportStateRequest(session_id=b, data=blob[:half]),
                                  pb.ImportStateRequest(data=blob[half:])])).session
    assert info.session_id == b
    blob_b = b"".join(c.data for c in stub.ExportState(pb.ExportStateRequest(session_id=b)))
    # safetensors may order metadata differently; the contents must be equal
    sa, sb = decode_state(blob), decode_state(blob_b)
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, entry in sa["state"].items():
        assert entry.keys() == sb["state"][i].keys()
        for key, value in entry.items():
            np.testing.assert_array_equal(sb["state"][i][key], value, strict=True)
    grads = {n: rand(rng, *x.shape) for n, x in init.items()}
    _, pa, _ = step(stub, a, grads)
    _, pb_, _ = step(stub, b, grads)
    assert_same(pb_, pa)


def test_export_import_round_trip(srv: Server) -> None:
    rng = np.random.default_rng(9)
    _export_import_round_trip(srv, {"w": rand(rng, 8, 16), "b": rand(rng, 16)})


def test_export_import_round_trip_scalar_tensor(srv: Server) -> None:
    _export_import_round_trip(srv, small_model(9))


def test_checkpoint_list_describe_delete(srv: Server) -> None:
    stub = srv.stub
    sid = new_id("ck")
    created = create(stub, sid, small_model(11), algorithm="rmsprop", max_grad_norm=1.5,
                     clip_per_tensor=True, skip_nonfinite=False, dtype=pb.STATE_DTYPE_FLOAT64)
    assert not created.HasField("checkpointed_step")  # none yet: absent, not -1
    step(stub, sid, small_grads(np.random.default_rng(12)))
    ck = stub.Checkpoint(pb.CheckpointRequest(session_id=sid)).checkpoint
    assert ck.session_id == sid and ck.step == 1 and ck.size_bytes > 0
    assert ck.path.startswith(f"sessions/{sid}/ckpt-")  # relative to the data directory
    assert (srv.store.checkpoints.data_dir / ck.path).is_dir()
    info = describe(stub, sid)
    assert info.HasField("checkpointed_step") and info.checkpointed_step == 1
    assert info.algorithm == pb.ALGORITHM_RMSPROP
    assert info.dtype == pb.STATE_DTYPE_FLOAT64 and info.backend == pb.BACKEND_CPU
    assert info.HasField("max_grad_norm") and info.max_grad_norm == 1.5
    assert info.clip_per_tensor and not info.skip_nonfinite
    assert info.state_bytes > 0 and not info.HasField("schedule")
    assert info.workers.count == 1 and info.workers.mode == pb.WORKER_MODE_SYNC
    assert "centered" in info.groups[0].flags and "alpha" in info.groups[0].values
    listed = stub.ListSessions(pb.ListSessionsRequest()).sessions
    assert sid in [s.session_id for s in listed]
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    assert sid not in [s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions]
    expect(lambda: describe(stub, sid), grpc.StatusCode.NOT_FOUND, sid,
           reason="SESSION_NOT_FOUND")
    expect(lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid)),
           grpc.StatusCode.NOT_FOUND, sid, reason="SESSION_NOT_FOUND")


# ---------------------------------------------------------------------------
# health, reflection, token


def reflect(channel: grpc.Channel, version: str,
            request: reflection_pb2.ServerReflectionRequest, metadata: Any = None
            ) -> reflection_pb2.ServerReflectionResponse:
    """One reflection request over grpc.reflection.<version> (v1 and v1alpha have the same
    messages, field for field, so v1alpha's classes serialise both)."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    (reply,) = list(call(iter([request]), metadata=metadata))
    return reply  # type: ignore[no-any-return]


def test_health_serving_and_reflection(srv: Server) -> None:
    health = health_pb2_grpc.HealthStub(srv.channel)
    for name in ("", SERVICE):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    for version in ("v1", "v1alpha"):
        out = reflect(srv.channel, version, reflection_pb2.ServerReflectionRequest(
            list_services=""))
        names = {s.name for s in out.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names, (version, names)
        for symbol in (SERVICE, f"grpc.reflection.{version}.ServerReflection"):
            out = reflect(srv.channel, version, reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=symbol))
            files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                     for raw in out.file_descriptor_response.file_descriptor_proto]
            assert symbol.rpartition(".")[2] in {
                svc.name for f in files for svc in f.service}, (version, symbol)
    # the v2 file and what it imports (Duration), so a client can build every message
    out = reflect(srv.channel, "v1", reflection_pb2.ServerReflectionRequest(
        file_by_filename="adamserve_proto/v2/optimizer.proto"))
    names = {descriptor_pb2.FileDescriptorProto.FromString(raw).name
             for raw in out.file_descriptor_response.file_descriptor_proto}
    assert names == {"adamserve_proto/v2/optimizer.proto", "google/protobuf/duration.proto"}
    # the stub generated for v1alpha agrees
    refl = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    assert list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))


def test_health_not_serving_until_ready(tmp_path: Path) -> None:
    s = Server(tmp_path, start=False)
    try:
        health = health_pb2_grpc.HealthStub(s.channel)
        req = health_pb2.HealthCheckRequest(service="")
        assert health.Check(req).status == health_pb2.HealthCheckResponse.NOT_SERVING
        s.service.start()
        deadline = time.monotonic() + 5
        while health.Check(req).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        s.close()


def test_token(tmp_path: Path) -> None:
    s = Server(tmp_path, token=TOKEN)
    try:
        stub = s.stub
        ok = (("authorization", f"Bearer {TOKEN}"),)
        bad = (("authorization", "Bearer nope"),)
        list_req = pb.ListSessionsRequest()
        for md in (None, bad, (("authorization", TOKEN),)):
            expect(lambda md=md: stub.ListSessions(list_req, metadata=md),
                   grpc.StatusCode.UNAUTHENTICATED, "Bearer", reason="UNAUTHENTICATED")
        assert len(stub.ListSessions(list_req, metadata=ok).sessions) == 0
        init = small_model()
        expect(lambda: create(stub, "t", init), grpc.StatusCode.UNAUTHENTICATED)
        expect(lambda: list(stub.Pull(pb.PullRequest(session_id="t"), metadata=bad)),
               grpc.StatusCode.UNAUTHENTICATED)
        assert not s.store.all()
        msgs = [pb.CreateSessionRequest(spec=pb.SessionSpec(
            session_id="t", algorithm=pb.ALGORITHM_ADAM,
            tensors=[pb.TensorSpec(name="w", shape=[3])]))]
        stub.CreateSession(iter(msgs), metadata=ok)
        grads = {"w": np.ones(3, np.float32)}
        expect(lambda: list(stub.Step(iter(step_requests("t", grads)), metadata=bad)),
               grpc.StatusCode.UNAUTHENTICATED)
        assert s.store.get("t").opt.step_count == 0
        out = list(stub.Step(iter(step_requests("t", grads)), metadata=ok))
        assert out[0].status.step == 1
        # health stays open; reflection needs the token (its streams would otherwise let
        # anyone hold the server's threads)
        health = health_pb2_grpc.HealthStub(s.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == (
            health_pb2.HealthCheckResponse.SERVING)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        for version in ("v1", "v1alpha"):
            expect(lambda v=version: reflect(s.channel, v, listing),  # type: ignore[misc]
                   grpc.StatusCode.UNAUTHENTICATED)
            assert reflect(s.channel, version, listing, ok).list_services_response.service
    finally:
        s.close()


# ---------------------------------------------------------------------------
# bad input: the right code, a message that says what was wrong, no state change


@pytest.fixture
def session(srv: Server) -> str:
    sid = new_id("bad")
    model = small_model(20)
    del model["s"]  # no scalar: see test_export_import_round_trip_scalar_tensor
    create(srv.stub, sid, model)
    grads = small_grads(np.random.default_rng(21))
    del grads["s"]
    step(srv.stub, sid, grads)
    return sid


def _chunk(name: str = "b", shape: tuple[int, ...] = (16,), datatype: str = "FP32",
           offset: int = 0, data: bytes | None = None) -> pb.StepRequest:
    if data is None:
        data = np.ones(16, np.float32).tobytes()
    return pb.StepRequest(chunk=pb.TensorChunk(name=name, shape=list(shape), datatype=datatype,
                                               offset=offset, data=data))


def _header(sid: str, **kw: Any) -> pb.StepRequest:
    return pb.StepRequest(header=pb.StepHeader(session_id=sid, **kw))


BAD_STEPS: dict[str, tuple[Callable[[str], list[pb.StepRequest]], grpc.StatusCode, tuple[
        str, ...]]] = {
    "unknown session": (lambda sid: [_header("no-such-session"), _chunk()],
                        grpc.StatusCode.NOT_FOUND, ("no-such-session",)),
    "empty session id": (lambda sid: [_header(""), _chunk()],
                         grpc.StatusCode.INVALID_ARGUMENT, ("session_id",)),
    "unknown tensor": (lambda sid: [_header(sid), _chunk(name="nope")],
                       grpc.StatusCode.INVALID_ARGUMENT, ("'nope'", "w, b")),
    "wrong shape": (lambda sid: [_header(sid), _chunk(shape=(4, 4))],
                    grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "[16]", "[4, 4]")),
    "negative shape": (lambda sid: [_header(sid), _chunk(shape=(-16,))],
                       grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "negative")),
    "ragged byte count": (lambda sid: [_header(sid), _chunk(data=b"\0" * 7)],
                          grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "7 bytes", "FP32")),
    "too many elements": (lambda sid: [_header(sid), _chunk(data=b"\0" * 68)],
                          grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "17 elements", "16")),
    "too few elements": (lambda sid: [_header(sid), _chunk(data=b"\0" * 60)],
                         grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "15 of 16")),
    "unknown datatype": (lambda sid: [_header(sid), _chunk(datatype="FP8")],
                         grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "'FP8'", "BF16")),
    "unknown return datatype": (lambda sid: [_header(sid, return_datatype="INT8"), _chunk()],
                                grpc.StatusCode.INVALID_ARGUMENT, ("return_datatype", "'INT8'")),
    "chunk out of order": (lambda sid: [_header(sid), _chunk(offset=8, data=b"\0" * 32),
                                        _chunk(offset=0, data=b"\0" * 32)],
                           grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "element 8", "expected 0")),
    "chunk sent twice": (lambda sid: [_header(sid), _chunk(), _chunk()],
                         grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "element 0", "expected 16")),
    "negative offset": (lambda sid: [_header(sid), _chunk(offset=-1)],
                        grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "offset")),
    "no header": (lambda sid: [_chunk()],
                  grpc.StatusCode.INVALID_ARGUMENT, ("first message", "header")),
    "empty stream": (lambda sid: [],
                     grpc.StatusCode.INVALID_ARGUMENT, ("empty stream", "header")),
    "header not first only": (lambda sid: [_header(sid), _chunk(), _header(sid)],
                              grpc.StatusCode.INVALID_ARGUMENT, ("header", "first message")),
    "empty message": (lambda sid: [_header(sid), pb.StepRequest()],
                      grpc.StatusCode.INVALID_ARGUMENT, ("chunk",)),
    "no gradients": (lambda sid: [_header(sid)],
                     grpc.StatusCode.INVALID_ARGUMENT, ("no gradient",)),
    "require_all": (lambda sid: [_header(sid, require_all=True), _chunk()],
                    grpc.StatusCode.INVALID_ARGUMENT, ("missing", "w")),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_is_refused_and_changes_nothing(srv: Server, session: str, case: str) -> None:
    build, code, needles = BAD_STEPS[case]
    before = srv.fp(session)
    expect(lambda: list(srv.stub.Step(iter(build(session)))), code, *needles)
    assert srv.fp(session) == before
    if case in ("unknown tensor", "chunk out of order", "no header"):
        pushes = [pb.PushRequest.FromString(m.SerializeToString()) for m in build(session)]
        expect(lambda: srv.stub.Push(iter(pushes)), code, *needles)
        assert srv.fp(session) == before
    # the session still steps normally afterwards
    status, _, _ = step(srv.stub, session, {"b": np.ones(16, np.float32)})
    assert status.step == 2


def test_nan_gradient_skips_the_step(srv: Server, session: str) -> None:
    before = srv.fp(session)
    params_before = pull(srv.stub, session)
    grads = small_grads(np.random.default_rng(22))
    del grads["s"]
    grads["b"][3] = np.nan
    grads["w"][0, 0] = np.inf
    status, params, _ = step(srv.stub, session, grads)
    assert status.skipped and status.step == 1
    assert sorted(status.nonfinite) == ["b", "w"]
    assert srv.fp(session) == before
    assert_same(params, params_before)


def test_malformed_protobuf_is_invalid_argument(srv: Server, session: str) -> None:
    before = srv.fp(session)
    raw_step = srv.channel.stream_stream(f"/{SERVICE}/Step",
                                         request_serializer=lambda b: b,
                                         response_deserializer=pb.StepResponse.FromString)
    expect(lambda: list(raw_step(iter([b"\xff\xff\xff\xff"]))),
           grpc.StatusCode.INVALID_ARGUMENT, "malformed", "StepRequest")
    raw_describe = srv.channel.unary_unary(f"/{SERVICE}/GetSession",
                                           request_serializer=lambda b: b,
                                           response_deserializer=pb.GetSessionResponse.FromString)
    expect(lambda: raw_describe(b"\x0a\x05ab"), grpc.StatusCode.INVALID_ARGUMENT, "malformed")
    assert srv.fp(session) == before


def test_bad_creates(srv: Server, session: str) -> None:
    stub = srv.stub
    n = len(srv.store.all())
    init = {"w": np.zeros((2, 2), np.float32)}
    before = srv.fp(session)
    expect(lambda: create(stub, session, init), grpc.StatusCode.ALREADY_EXISTS, session,
           reason="SESSION_EXISTS")
    assert srv.fp(session) == before

    def create_spec(**spec: Any) -> Any:
        return stub.CreateSession(iter([pb.CreateSessionRequest(spec=pb.SessionSpec(
            session_id=new_id(), tensors=[pb.TensorSpec(name="w", shape=[2, 2])], **spec))]))

    expect(lambda: create_spec(), grpc.StatusCode.INVALID_ARGUMENT, "algorithm", "not set",
           "ALGORITHM_ADAMW")
    expect(lambda: create_spec(algorithm=42), grpc.StatusCode.INVALID_ARGUMENT, "algorithm",
           "42", "ALGORITHM_LAMB")
    expect(lambda: create(stub, new_id(), init, groups=[pb.Group(values={"lr": -1.0})]),
           grpc.StatusCode.INVALID_ARGUMENT, "lr", ">= 0")
    expect(lambda: create(stub, new_id(), init, groups=[pb.Group(values={"bogus": 1.0})]),
           grpc.StatusCode.INVALID_ARGUMENT, "'bogus'")
    expect(lambda: create(stub, new_id(), init, groups=[pb.Group(values={"amsgrad": 1.0})]),
           grpc.StatusCode.INVALID_ARGUMENT, "amsgrad", "true or false")
    expect(lambda: create(stub, new_id(), init, groups=[pb.Group(values={"lr": 1.0},
                                                                 flags={"lr": True})]),
           grpc.StatusCode.INVALID_ARGUMENT, "lr", "value and as a flag")
    expect(lambda: create(stub, new_id(), init, schedule=pb.Schedule()),
           grpc.StatusCode.INVALID_ARGUMENT, "schedule", "no kind", "cosine")
    expect(lambda: create(stub, new_id(), init,
                          schedule=pb.Schedule(cosine=pb.CosineSchedule())),
           grpc.StatusCode.INVALID_ARGUMENT, "schedule.total_steps", ">= 1")
    expect(lambda: create(stub, new_id(), init, schedule=pb.Schedule(join=pb.JoinSchedule(
               schedules=[pb.Schedule(constant=pb.ConstantSchedule()), pb.Schedule()],
               milestones=[3]))),
           grpc.StatusCode.INVALID_ARGUMENT, "schedule.join.schedules[1]", "no kind")
    expect(lambda: create(stub, new_id(), init, schedule=pb.Schedule(
               one_cycle=pb.OneCycleSchedule(total_steps=10, anneal_strategy=9))),
           grpc.StatusCode.INVALID_ARGUMENT, "anneal_strategy", "9", "ANNEAL_STRATEGY_LINEAR")
    expect(lambda: create(stub, new_id(), init, dtype=5),
           grpc.StatusCode.INVALID_ARGUMENT, "dtype", "5", "STATE_DTYPE_FLOAT64")
    expect(lambda: create(stub, new_id(), init, workers=pb.Workers(count=2, mode=7)),
           grpc.StatusCode.INVALID_ARGUMENT, "workers.mode", "WORKER_MODE_ASYNC")
    expect(lambda: create(stub, new_id(), init, workers=pb.Workers(
               count=2, straggler_timeout=Duration(seconds=-1))),
           grpc.StatusCode.INVALID_ARGUMENT, "workers.straggler_timeout", "negative")
    expect(lambda: create(stub, "bad id!", init), grpc.StatusCode.INVALID_ARGUMENT, "bad id!")
    expect(lambda: create(stub, new_id(), {}), grpc.StatusCode.INVALID_ARGUMENT, "tensor")
    # initial values are checked like gradients
    short = [pb.CreateSessionRequest(spec=pb.SessionSpec(
                 session_id=new_id(), algorithm=pb.ALGORITHM_ADAM,
                 tensors=[pb.TensorSpec(name="w", shape=[4])])),
             pb.CreateSessionRequest(initial=pb.TensorChunk(name="w", shape=[4], datatype="FP32",
                                                            data=b"\0" * 8))]
    expect(lambda: stub.CreateSession(iter(short)), grpc.StatusCode.INVALID_ARGUMENT, "'w'",
           "2 of 4")
    expect(lambda: stub.CreateSession(iter([pb.CreateSessionRequest(initial=pb.TensorChunk())])),
           grpc.StatusCode.INVALID_ARGUMENT, "spec")
    expect(lambda: stub.CreateSession(iter([])), grpc.StatusCode.INVALID_ARGUMENT, "empty stream")
    # memory: over the store's cap is RESOURCE_EXHAUSTED; past any sane size INVALID_ARGUMENT
    msgs = [pb.CreateSessionRequest(spec=pb.SessionSpec(
        session_id=new_id("huge"), algorithm=pb.ALGORITHM_ADAM,
        tensors=[pb.TensorSpec(name="w", shape=[100_000, 100_000])]))]
    expect(lambda: stub.CreateSession(iter(msgs)), grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes",
           reason="QUOTA_EXCEEDED")
    msgs[0].spec.tensors[0].shape[:] = [1 << 40, 1 << 40]
    expect(lambda: stub.CreateSession(iter(msgs)), grpc.StatusCode.INVALID_ARGUMENT, "elements; at most")
    msgs[0].spec.tensors[0].shape[:] = [-3]
    expect(lambda: stub.CreateSession(iter(msgs)), grpc.StatusCode.INVALID_ARGUMENT, "negative")
    assert len(srv.store.all()) == n  # nothing was left behind


def test_bad_hyperparameters_schedules_and_pulls(srv: Server, session: str) -> None:
    stub = srv.stub
    before = srv.fp(session)

    def set_h(group: int = 0, **kw: Any) -> Any:
        return stub.SetHyperparameters(pb.SetHyperparametersRequest(
            session_id=session, group=group, changes=pb.Group(**kw)))

    expect(lambda: set_h(values={"lr": float("nan")}), grpc.StatusCode.INVALID_ARGUMENT, "lr",
           "finite")
    expect(lambda: set_h(values={"beta2": 1.5}), grpc.StatusCode.INVALID_ARGUMENT, "beta2")
    expect(lambda: set_h(values={"momentum": 0.9}), grpc.StatusCode.INVALID_ARGUMENT,
           "'momentum'")
    expect(lambda: set_h(group=3, values={"lr": 0.1}), grpc.StatusCode.INVALID_ARGUMENT,
           "group 3")
    expect(lambda: stub.SetSchedule(pb.SetScheduleRequest(
               session_id=session, schedule=pb.Schedule(step=pb.StepSchedule(step_size=0)))),
           grpc.StatusCode.INVALID_ARGUMENT, "schedule.step_size")
    expect(lambda: stub.SetSchedule(pb.SetScheduleRequest(session_id="ghost")),
           grpc.StatusCode.NOT_FOUND, "ghost")
    expect(lambda: list(stub.Pull(pb.PullRequest(session_id=session, names=["zz"]))),
           grpc.StatusCode.INVALID_ARGUMENT, "'zz'")
    expect(lambda: list(stub.Pull(pb.PullRequest(session_id=session, datatype="fp32"))),
           grpc.StatusCode.INVALID_ARGUMENT, "'fp32'")
    expect(lambda: list(stub.Pull(pb.PullRequest(session_id="ghost"))),
           grpc.StatusCode.NOT_FOUND, "ghost")
    expect(lambda: list(stub.Pull(pb.PullRequest(session_id=session,
                                                 timeout=Duration(nanos=-5)))),
           grpc.StatusCode.INVALID_ARGUMENT, "timeout", "negative")
    assert srv.fp(session) == before
    # removing a schedule that is not there is fine, and changes nothing
    info = stub.SetSchedule(pb.SetScheduleRequest(session_id=session)).session
    assert not info.HasField("schedule") and srv.fp(session) == before


def test_bad_add_tensors_are_refused_and_change_nothing(srv: Server, session: str) -> None:
    stub = srv.stub
    before = srv.fp(session)
    group = pb.Group(values={"lr": 0.1})
    two = {"n": np.ones(2, np.float32)}

    def add(msgs: list[pb.AddTensorsRequest]) -> Any:
        return stub.AddTensors(iter(msgs))

    cases: list[tuple[list[pb.AddTensorsRequest], grpc.StatusCode, tuple[str, ...]]] = [
        (add_requests(session, [("w", (2,), 1)], new_group=group),
         grpc.StatusCode.INVALID_ARGUMENT, ("already in the session: w",)),
        (add_requests(session, [("n", (2,), 0), ("n", (2,), 0)]),
         grpc.StatusCode.INVALID_ARGUMENT, ("repeated: n",)),
        (add_requests(session, [("n", (2,), 5)], new_group=group),
         grpc.StatusCode.INVALID_ARGUMENT, ("group 5 does not exist",)),
        (add_requests(session, [("n", (2,), 1)]),  # no new group: group 1 is not there
         grpc.StatusCode.INVALID_ARGUMENT, ("group 1 does not exist",)),
        (add_requests("ghost", [("n", (2,), 1)], new_group=group),
         grpc.StatusCode.NOT_FOUND, ("ghost",)),
        (add_requests("", [("n", (2,), 1)], new_group=group),
         grpc.StatusCode.INVALID_ARGUMENT, ("spec.session_id",)),
        (add_requests(session, [("n", (2,), 1)], new_group=pb.Group(values={"lr": -1.0})),
         grpc.StatusCode.INVALID_ARGUMENT, ("lr", ">= 0")),
        (add_requests(session, [("n", (2,), 1)], new_group=pb.Group(values={"momentum": 0.9})),
         grpc.StatusCode.INVALID_ARGUMENT, ("'momentum'",)),
        (add_requests(session, [("n", (2,), 1)],
                      new_group=pb.Group(values={"lr": 0.1}, flags={"lr": True})),
         grpc.StatusCode.INVALID_ARGUMENT, ("new_group", "value and as a flag")),
        (add_requests(session, [("n", (-2,), 0)]),
         grpc.StatusCode.INVALID_ARGUMENT, ("'n'", "negative")),
        (add_requests(session, [("n", (1 << 40, 1 << 40), 0)]),
         grpc.StatusCode.INVALID_ARGUMENT, ("'n'", "elements; at most")),
        (add_requests(session, [("n", (1,) * 65, 0)]),
         grpc.StatusCode.INVALID_ARGUMENT, ("'n'", "dimensions")),
        (add_requests(session, [("n", (100_000, 100_000), 0)]),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ("bytes",)),
        # initial values are checked like gradients, against the new tensors only
        (add_requests(session, [("n", (4,), 0)], two),
         grpc.StatusCode.INVALID_ARGUMENT, ("'n'", "expected shape [4], got [2]")),
        (add_requests(session, [("n", (2,), 0)], {"w": np.ones((8, 16), np.float32)}),
         grpc.StatusCode.INVALID_ARGUMENT, ("'w'",)),
        (add_requests(session, [("n", (2,), 0)], {"n": np.ones(2, np.float32)})[1:],
         grpc.StatusCode.INVALID_ARGUMENT, ("first message", "spec")),
        ([], grpc.StatusCode.INVALID_ARGUMENT, ("empty stream", "spec")),
        (add_requests(session, [("n", (2,), 0)], two) + add_requests(session, []),
         grpc.StatusCode.INVALID_ARGUMENT, ("`spec` may only be sent in the first message",)),
        ([*add_requests(session, [("n", (2,), 0)]), pb.AddTensorsRequest()],
         grpc.StatusCode.INVALID_ARGUMENT, ("initial",)),
    ]
    for msgs, code, needles in cases:
        expect(lambda: add(msgs), code, *needles)  # noqa: B023 (called at once)
        assert srv.fp(session) == before, needles
    info = describe(stub, session)
    assert [t.name for t in info.tensors] == ["w", "b"] and len(info.groups) == 1
    # the session still steps, and grows, normally afterwards
    status, _, _ = step(srv.stub, session, {"b": np.ones(16, np.float32)})
    assert status.step == 2
    info = add(add_requests(session, [("n", (2,), 1)], two, new_group=group)).session
    assert [t.name for t in info.tensors] == ["w", "b", "n"] and len(info.groups) == 2


def set_requests(sid: str, values: Arrays, per_chunk: int | None = None
                 ) -> list[pb.SetParametersRequest]:
    msgs = [pb.SetParametersRequest(session_id=sid)]
    for n, a in values.items():
        msgs += [pb.SetParametersRequest(value=c) for c in tensor_chunks(n, a, "FP32", per_chunk)]
    return msgs


def test_set_parameters_mid_run_equals_local(stub: pb_grpc.OptimizerServiceStub) -> None:
    """Whole tensors overwritten between steps (in chunks, in any datatype); the moments
    and step count stay, the other tensors keep their values."""
    sid = new_id()
    init = small_model(3)
    create(stub, sid, init)
    ref = local(init)
    rng = np.random.default_rng(4)
    grads = small_grads(rng)
    step(stub, sid, grads)
    local_step(ref, grads)
    w = rand(rng, 8, 16)
    info = stub.SetParameters(iter(set_requests(sid, {"w": w}, per_chunk=50))).session
    assert info.step == 1
    ref.param[ref.layout.span(ref.layout.index("w"))] = w.reshape(-1)
    half = np.full(16, 0.5, np.float32)
    stub.SetParameters(iter([pb.SetParametersRequest(session_id=sid),
                             *[pb.SetParametersRequest(value=c)
                               for c in tensor_chunks("b", half, "FP16")]]))
    ref.param[ref.layout.span(ref.layout.index("b"))] = half
    _, params, _ = step(stub, sid, grads)
    assert_same(params, local_step(ref, grads))


def test_bad_set_parameters_are_refused_and_change_nothing(srv: Server, session: str) -> None:
    before = srv.fp(session)
    w = np.ones((8, 16), np.float32)
    cases: list[tuple[list[pb.SetParametersRequest], grpc.StatusCode, tuple[str, ...]]] = [
        (set_requests(session, {"zz": w}), grpc.StatusCode.INVALID_ARGUMENT,
         ("'zz' is not in this session",)),
        (set_requests(session, {"w": np.ones((16, 8), np.float32)}),
         grpc.StatusCode.INVALID_ARGUMENT, ("expected shape [8, 16], got [16, 8]",)),
        (set_requests(session, {"w": w}, per_chunk=50)[:2], grpc.StatusCode.INVALID_ARGUMENT,
         ("received 50 of 128 elements",)),
        (set_requests(session, {"w": w, "b": np.ones(3, np.float32)}),
         grpc.StatusCode.INVALID_ARGUMENT, ("'b'", "expected shape [16], got [3]")),
        (set_requests(session, {}), grpc.StatusCode.INVALID_ARGUMENT,
         ("no parameter tensors",)),
        (set_requests("ghost", {"w": w}), grpc.StatusCode.NOT_FOUND, ("ghost",)),
        (set_requests("", {"w": w}), grpc.StatusCode.INVALID_ARGUMENT, ("session_id",)),
        (set_requests(session, {"w": w})[1:], grpc.StatusCode.INVALID_ARGUMENT,
         ("first message", "session_id")),
        ([], grpc.StatusCode.INVALID_ARGUMENT, ("empty stream",)),
        ([*set_requests(session, {"w": w}), pb.SetParametersRequest(session_id=session)],
         grpc.StatusCode.INVALID_ARGUMENT, ("`session_id` may only be sent in the first",)),
    ]
    for msgs, code, needles in cases:
        expect(lambda: srv.stub.SetParameters(iter(msgs)), code,  # noqa: B023 (called at once)
               *needles)
        assert srv.fp(session) == before, needles


def test_import_garbage_state_is_refused(srv: Server, session: str) -> None:
    stub = srv.stub
    before = srv.fp(session)
    blob = b"".join(c.data for c in stub.ExportState(pb.ExportStateRequest(session_id=session)))
    header_len = int.from_bytes(blob[:8], "little")
    wrong_tag = blob.replace(b"state_dict/1", b"state_dict/9")
    garbage = {
        "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)),
        "too short": b"\x01\x02",
        "truncated": blob[: 8 + header_len + 10],
        "wrong tag": wrong_tag,
        "empty": b"",
    }
    for name, data in garbage.items():
        details = expect(lambda data=data: stub.ImportState(iter([pb.ImportStateRequest(
            session_id=session, data=data)])), grpc.StatusCode.INVALID_ARGUMENT, "state")
        assert details, name
        assert srv.fp(session) == before, name
    expect(lambda: stub.ImportState(iter([pb.ImportStateRequest(session_id="ghost", data=blob)])),
           grpc.StatusCode.NOT_FOUND, "ghost")
    expect(lambda: stub.ImportState(iter([pb.ImportStateRequest(data=blob)])),
           grpc.StatusCode.INVALID_ARGUMENT, "session_id")
    expect(lambda: stub.ImportState(iter([pb.ImportStateRequest(session_id=session, data=blob),
                                          pb.ImportStateRequest(session_id="x", data=b"")])),
           grpc.StatusCode.INVALID_ARGUMENT, "'x'")
    # a state blob of another session's layout
    other = new_id()
    create(stub, other, {"q": np.zeros(3, np.float32)})
    step(stub, other, {"q": np.ones(3, np.float32)})
    theirs = b"".join(c.data for c in stub.ExportState(pb.ExportStateRequest(session_id=other)))
    expect(lambda: stub.ImportState(iter([pb.ImportStateRequest(session_id=session,
                                                                data=theirs)])),
           grpc.StatusCode.INVALID_ARGUMENT, "state_dict")
    assert srv.fp(session) == before
    # the real blob still imports
    stub.ImportState(iter([pb.ImportStateRequest(session_id=session, data=blob)]))
    assert srv.fp(session) == before


def test_unexpected_errors_are_internal_and_generic(srv: Server, session: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(session_id: str) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(srv.service, "describe", boom)
    details = expect(lambda: describe(srv.stub, session), grpc.StatusCode.INTERNAL,
                     "internal error", reason="INTERNAL")
    assert "secret" not in details


