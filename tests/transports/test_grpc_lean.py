"""The gRPC bulk path without protobuf's copies, on a real server (127.0.0.1, port 0).

Large messages that carry a chunk are read by hand on both sides
(adamserve_proto.wire.read_chunk_message); small ones, and any the hand reader leaves
alone, by protobuf. Every test here compares the two paths with each other and with
torch, or checks that bad bytes on the hand path are refused as protobuf's parser
refuses them: INVALID_ARGUMENT naming what was wrong, nothing changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.grpc.servicer import UnaryStep, method_handlers
from adamserve_client import errors
from adamserve_client.transports._codec import ChunkAssembler
from adamserve_client.transports.base import WireTensor
from adamserve_client.transports.grpc import GrpcTransport, _response_parser
from adamserve_proto import rpc, wire
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

# elements of a tensor whose chunks are read by hand (a chunk of 1.6 MB, then 4 MiB ones)
BIG = 1_400_000
SMALL = 1000  # a few KiB: protobuf's path
ITEM = {"FP32": 4, "BF16": 2, "FP64": 8}
LR = 1e-3


class Server:
    def __init__(self, tmp: Path) -> None:
        self.store = SessionStore(CpuBackend(), CheckpointStore(tmp), Limits(max_state_bytes=1 << 30))
        self.service = OptimizerService(self.store)
        self.service.start()
        self.server, self.port = build_grpc_server(self.service, port=0)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.OptimizerServiceStub(self.channel)
        # raw methods: our own bytes in, the reply bytes out
        self.raw = {name: getattr(self.channel, r.kind)(
            r.path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for name, r in rpc.RPCS.items()}

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)

    def fp(self, sid: str) -> str:
        return self.store.get(sid).fingerprint()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("lean"))
    yield s
    s.close()


_ids = iter(range(1_000_000))


def new_id() -> str:
    return f"lean-{next(_ids)}"


def bf16(x: np.ndarray) -> np.ndarray:
    """torch's bfloat16 rounding, widened back to float32 (the reference)."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def encode(x: np.ndarray, datatype: str) -> bytes:
    if datatype == "BF16":
        bits = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16)
        return bits.view(torch.int16).numpy().tobytes()
    return np.ascontiguousarray(x, {"FP32": "<f4", "FP64": "<f8"}[datatype]).tobytes()


def decode(data: bytes, datatype: str) -> np.ndarray:
    if datatype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, {"FP32": "<f4", "FP64": "<f8"}[datatype]).astype(np.float32)


def chunk_bytes(name: str, x: np.ndarray, datatype: str, wrap: Any,
                max_bytes: int = wire.MAX_MESSAGE_BYTES) -> list[bytes]:
    return list(wire.chunk_messages(name, x.shape, datatype, encode(x.reshape(-1), datatype),
                                    itemsize=ITEM[datatype], wrap=wrap, max_bytes=max_bytes))


def create(srv: Server, sid: str, init: dict[str, np.ndarray],
           max_bytes: int = wire.MAX_MESSAGE_BYTES) -> None:
    spec = pb.SessionSpec(session_id=sid, algorithm=pb.ALGORITHM_ADAM,
                          tensors=[pb.TensorSpec(name=n, shape=list(a.shape))
                                   for n, a in init.items()])
    msgs = [pb.CreateSessionRequest(spec=spec).SerializeToString()]
    for n, a in init.items():
        msgs += chunk_bytes(n, a, "FP32", wire.CREATE_INITIAL, max_bytes)
    srv.raw["CreateSession"](iter(msgs))


def step_raw(srv: Server, messages: list[bytes]) -> list[bytes]:
    return list(srv.raw["Step"](iter(messages)))


def step_messages(sid: str, grads: dict[str, np.ndarray], datatype: str = "FP32",
                  ret: str = "FP32", max_bytes: int = wire.MAX_MESSAGE_BYTES) -> list[bytes]:
    msgs = [pb.StepRequest(header=pb.StepHeader(session_id=sid, return_datatype=ret)
                           ).SerializeToString()]
    for n, g in grads.items():
        msgs += chunk_bytes(n, g, datatype, wire.STEP_CHUNK, max_bytes)
    return msgs


def params_of(replies: list[bytes]) -> dict[str, np.ndarray]:
    """A Step reply's parameters, read by protobuf (the reference reader)."""
    parts: dict[str, list[bytes]] = {}
    types: dict[str, str] = {}
    for raw in replies:
        msg = pb.StepResponse.FromString(raw)
        if msg.WhichOneof("kind") == "param":
            parts.setdefault(msg.param.name, []).append(msg.param.data)
            types[msg.param.name] = msg.param.datatype
    return {n: decode(b"".join(p), types[n]) for n, p in parts.items()}


def torch_adam(init: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    p = torch.nn.Parameter(torch.from_numpy(init.astype(np.float32).copy()))
    opt = torch.optim.Adam([p], lr=LR)
    for g in grads:
        p.grad = torch.from_numpy(g.astype(np.float32).copy())
        opt.step()
    return p.detach().numpy()


def expect(fn: Callable[[], Any], code: grpc.StatusCode, *needles: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err: Any = info.value
    assert err.code() == code, (err.code(), err.details())
    for needle in needles:
        assert needle in (err.details() or ""), (needle, err.details())


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# ---------------------------------------------------------------------------
# the server reads large chunks by hand


def test_large_chunks_step_as_small_ones_and_as_torch(srv: Server,
                                                     rng: np.random.Generator) -> None:
    init = {"w": rng.standard_normal(BIG).astype(np.float32),
            "b": rng.standard_normal((40, 25)).astype(np.float32)}
    lean, small = new_id(), new_id()
    create(srv, lean, init)  # 4 MiB messages: read by hand
    create(srv, small, init, max_bytes=64 * 1024)  # below BY_HAND_BYTES: protobuf's
    grads = [{n: rng.standard_normal(a.shape).astype(np.float32) * 1e-2 for n, a in init.items()}
             for _ in range(2)]
    for g in grads:
        got = params_of(step_raw(srv, step_messages(lean, g)))
        want = params_of(step_raw(srv, step_messages(small, g, max_bytes=64 * 1024)))
    assert srv.fp(lean) == srv.fp(small)
    for n in init:
        assert np.array_equal(got[n], want[n])
        np.testing.assert_allclose(got[n], torch_adam(init[n], [g[n] for g in grads]).reshape(-1),
                                   rtol=1e-5, atol=1e-7)


def test_bf16_both_ways_on_the_hand_path(srv: Server, rng: np.random.Generator) -> None:
    init = {"w": rng.standard_normal(BIG).astype(np.float32)}
    sid = new_id()
    create(srv, sid, init)
    g = {"w": rng.standard_normal(BIG).astype(np.float32) * 1e-2}
    got = params_of(step_raw(srv, step_messages(sid, g, "BF16", "BF16")))
    want = bf16(torch_adam(init["w"], [bf16(g["w"])]))
    # the server's float32 result rounded as torch rounds it: equal within one bf16 step
    np.testing.assert_allclose(got["w"], want, rtol=2 ** -8)
    assert np.array_equal(got["w"], bf16(got["w"]))  # exactly bf16 values


def test_valid_but_unusual_large_messages_are_protobufs_to_read(
        srv: Server, rng: np.random.Generator) -> None:
    # fields reordered, the shape unpacked, an unknown field: protobuf reads them all
    init = {"w": np.zeros(BIG, np.float32)}
    plain, odd = new_id(), new_id()
    create(srv, plain, init)
    create(srv, odd, init)
    g = rng.standard_normal(BIG).astype(np.float32)
    data = g.tobytes()
    step_raw(srv, step_messages(plain, {"w": g}, max_bytes=8 * wire.MiB))
    chunk = (wire.length_delimited(5, data) + wire.key(2, 0) + wire.varint(BIG)
             + wire.length_delimited(3, b"FP32") + wire.length_delimited(1, b"w")
             + wire.key(15, 0) + wire.varint(1))
    head = pb.StepRequest(header=pb.StepHeader(session_id=odd)).SerializeToString()
    step_raw(srv, [head, wire.length_delimited(wire.STEP_CHUNK.number, chunk)])
    assert srv.fp(plain) == srv.fp(odd)


def _bad_large(sid: str) -> dict[str, tuple[list[bytes], tuple[str, ...]]]:
    g = np.ones(BIG, np.float32)
    good = step_messages(sid, {"w": g})
    head, first = good[0], good[1]
    return {
        "truncated": ([head, first[:-5]], ("malformed", "Request message", "corrupt")),
        "wrong shape": ([head, *chunk_bytes("w", g.reshape(1000, 1400), "FP32",
                                            wire.STEP_CHUNK)],
                        ("'w'", "[1400000]", "[1000, 1400]")),
        "unknown tensor": ([head, *chunk_bytes("nope", g, "FP32", wire.STEP_CHUNK)],
                           ("'nope'",)),
        "out of order": ([head, good[2], first], ("'w'", "expected 0")),
        "chunk first": (good[1:], ("first message", "`header`", "`chunk`")),
        "too few elements": ([head, first], ("'w'", "of 1400000 elements")),
        "negative offset": ([head, wire.length_delimited(wire.STEP_CHUNK.number, (
            wire.length_delimited(1, b"w") + wire.length_delimited(2, wire.varint(BIG))
            + wire.key(4, 0) + wire.varint(-4) + wire.length_delimited(5, bytes(200_000))))],
            ("'w'", "negative")),
        "bad datatype": ([head, wire.length_delimited(wire.STEP_CHUNK.number, (
            wire.length_delimited(1, b"w") + wire.length_delimited(2, wire.varint(BIG))
            + wire.length_delimited(3, b"FP99") + wire.length_delimited(5, bytes(400_000))))],
            ("'w'", "'FP99'")),
    }


@pytest.mark.parametrize("case", ["truncated", "wrong shape", "unknown tensor", "out of order",
                                  "chunk first", "too few elements", "negative offset",
                                  "bad datatype"])
def test_bad_large_messages_are_refused_and_change_nothing(srv: Server, case: str) -> None:
    sid = new_id()
    create(srv, sid, {"w": np.zeros(BIG, np.float32)})
    before = srv.fp(sid)
    msgs, needles = _bad_large(sid)[case]
    assert all(len(m) >= wire.BY_HAND_BYTES for m in msgs[1:])  # the hand path's
    expect(lambda: step_raw(srv, msgs), grpc.StatusCode.INVALID_ARGUMENT, *needles)
    assert srv.fp(sid) == before
    # Push reads the same chunk messages (its chunk field has the same number)
    push = msgs if case == "chunk first" else [
        pb.PushRequest(header=pb.StepHeader(session_id=sid)).SerializeToString(), *msgs[1:]]
    expect(lambda: srv.raw["Push"](iter(push)), grpc.StatusCode.INVALID_ARGUMENT, *needles)
    assert srv.fp(sid) == before


def test_set_parameters_and_add_tensors_read_large_chunks(srv: Server,
                                                         rng: np.random.Generator) -> None:
    sid = new_id()
    create(srv, sid, {"w": np.zeros(BIG, np.float32)})
    w = rng.standard_normal(BIG).astype(np.float32)
    srv.raw["SetParameters"](iter([pb.SetParametersRequest(session_id=sid).SerializeToString(),
                                   *chunk_bytes("w", w, "FP32", wire.SET_PARAMETERS_VALUE)]))
    n = rng.standard_normal(500_000).astype(np.float32)
    spec = pb.AddTensorsSpec(session_id=sid, tensors=[pb.TensorSpec(name="n", shape=[500_000])])
    srv.raw["AddTensors"](iter([pb.AddTensorsRequest(spec=spec).SerializeToString(),
                                *chunk_bytes("n", n, "FP32", wire.ADD_TENSORS_INITIAL)]))
    pulled = {}
    for raw in srv.raw["Pull"](pb.PullRequest(session_id=sid).SerializeToString()):
        c = pb.PullResponse.FromString(raw).chunk
        pulled.setdefault(c.name, []).append(c.data)
    assert np.array_equal(decode(b"".join(pulled["w"]), "FP32"), w)
    assert np.array_equal(decode(b"".join(pulled["n"]), "FP32"), n)


# ---------------------------------------------------------------------------
# StepUnary: protobuf for small messages, by hand for large ones, the same answers


@pytest.mark.parametrize("numel", [SMALL, 100_000])
def test_step_unary_by_protobuf_and_by_hand(srv: Server, rng: np.random.Generator,
                                            numel: int) -> None:
    init = rng.standard_normal(numel).astype(np.float32)
    unary, stream = new_id(), new_id()
    create(srv, unary, {"w": init})
    create(srv, stream, {"w": init})
    g = rng.standard_normal(numel).astype(np.float32)
    header = pb.StepHeader(session_id=unary)
    raw = pb.StepUnaryRequest(header=header, gradients=[pb.TensorChunk(
        name="w", shape=[numel], datatype="FP32", data=g.tobytes())]).SerializeToString()
    assert (len(raw) >= wire.BY_HAND_BYTES) == (numel > SMALL)
    reply = pb.StepUnaryResponse.FromString(srv.raw["StepUnary"](raw))
    assert reply.status.step == 1 and [p.name for p in reply.params] == ["w"]
    want = params_of(step_raw(srv, step_messages(stream, {"w": g})))
    assert np.array_equal(decode(reply.params[0].data, "FP32"), want["w"])
    assert srv.fp(unary) == srv.fp(stream)
    # a gradient that does not fit its tensor is refused either way, nothing changed
    before = srv.fp(unary)
    bad = pb.StepUnaryRequest(header=header, gradients=[pb.TensorChunk(
        name="w", shape=[numel], datatype="FP32", data=g.tobytes()[:-4])]).SerializeToString()
    expect(lambda: srv.raw["StepUnary"](bad), grpc.StatusCode.INVALID_ARGUMENT, "'w'",
           f"{numel - 1} of {numel}")
    expect(lambda: srv.raw["StepUnary"](raw[:-3]), grpc.StatusCode.INVALID_ARGUMENT,
           "malformed", "StepUnaryRequest")
    assert srv.fp(unary) == before


# ---------------------------------------------------------------------------
# the client: writes StepUnary by hand when large, gathers chunks read by hand


@pytest.mark.parametrize("numel", [SMALL, 200_000, 3 * wire.MiB])  # unary twice, then Step
def test_client_steps_equal_torch(srv: Server, rng: np.random.Generator, numel: int) -> None:
    init = rng.standard_normal(numel).astype(np.float32)
    sid = new_id()
    create(srv, sid, {"w": init})
    client = GrpcTransport(f"grpc://127.0.0.1:{srv.port}")
    try:
        grads = [rng.standard_normal(numel).astype(np.float32) for _ in range(2)]
        for g in grads:
            result = client.step(sid, [WireTensor("w", (numel,), "FP32", g.tobytes())])
        (p,) = result.params
        assert p.name == "w" and p.shape == (numel,) and len(memoryview(p.data)) == 4 * numel
        np.testing.assert_allclose(np.frombuffer(p.data, np.float32), torch_adam(init, grads),
                                   rtol=1e-5, atol=1e-7)
        # the parameters pulled over the stream, in 4 MiB chunks, gathered into one tensor
        (pulled,) = client.pull(sid)
        assert bytes(pulled.data) == bytes(p.data)
    finally:
        client.close()


def test_client_bf16_round_trip_on_the_hand_path(srv: Server, rng: np.random.Generator) -> None:
    numel = 3 * wire.MiB  # 6 MiB of BF16 each way: two chunks per tensor
    init = rng.standard_normal(numel).astype(np.float32)
    sid = new_id()
    create(srv, sid, {"w": init})
    client = GrpcTransport(f"grpc://127.0.0.1:{srv.port}")
    try:
        g = rng.standard_normal(numel).astype(np.float32)
        result = client.step(sid, [WireTensor("w", (numel,), "BF16", encode(g, "BF16"))],
                             return_datatype="BF16")
        (p,) = result.params
        got = decode(bytes(p.data), "BF16")
        np.testing.assert_allclose(got, bf16(torch_adam(init, [bf16(g)])), rtol=2 ** -8)
    finally:
        client.close()


def test_chunk_assembler_refuses_chunks_that_do_not_fit() -> None:
    a = ChunkAssembler()
    a.add("w", (4,), "FP32", 0, bytes(8))
    with pytest.raises(errors.ServerError, match="from byte 12, expected 8"):
        a.add("w", (4,), "FP32", 3, bytes(4))
    a.add("w", (4,), "FP32", 2, bytes(4))
    with pytest.raises(errors.ServerError, match="sent 12 of tensor 'w'"):
        a.tensors()
    b = ChunkAssembler()
    b.add("v", (2,), "FP32", 0, bytes(4))
    with pytest.raises(errors.ServerError, match="past its end"):
        b.add("v", (2,), "FP32", 1, bytes(8))
    c = ChunkAssembler()
    whole = memoryview(b"\x00\x00\x80?")
    c.add("s", (), "FP32", 0, whole)
    (t,) = c.tensors()
    assert t.data is whole  # one chunk for the whole tensor: kept, not copied
    with pytest.raises(errors.ServerError, match="disagree"):
        c.add("s", (), "FP32", 0, whole)


# ---------------------------------------------------------------------------
# which reader reads what


def test_large_chunk_messages_reach_the_service_as_views(srv: Server) -> None:
    handlers = method_handlers(srv.service)
    g = np.ones(BIG, np.float32)
    for name, wrap in (("Step", wire.STEP_CHUNK), ("Push", wire.PUSH_CHUNK),
                       ("CreateSession", wire.CREATE_INITIAL),
                       ("AddTensors", wire.ADD_TENSORS_INITIAL),
                       ("SetParameters", wire.SET_PARAMETERS_VALUE)):
        parse = handlers[name].request_deserializer
        assert parse is not None
        big = chunk_bytes("w", g, "FP32", wrap)[0]
        view = parse(big)
        assert isinstance(view, wire.ChunkView) and view.data.obj is big, name
        (small,) = chunk_bytes("w", g[:SMALL], "FP32", wrap)
        assert not isinstance(parse(small), wire.ChunkView), name  # protobuf: faster there
    header = pb.StepHeader(session_id="x")
    unary = handlers["StepUnary"].request_deserializer
    assert unary is not None
    big = pb.StepUnaryRequest(header=header, gradients=[pb.TensorChunk(
        name="w", data=g.tobytes())]).SerializeToString()
    got = unary(big)
    assert isinstance(got, UnaryStep) and got.header == header
    assert got.gradients[0].data.obj is big


def test_the_client_reads_large_replies_by_hand() -> None:
    data = np.ones(BIG, np.float32).tobytes()
    big = next(wire.chunk_messages("w", (BIG,), "FP32", data, itemsize=4, wrap=wire.STEP_PARAM))
    for name in ("Step", "Commit"):
        view = _response_parser(rpc.RPCS[name])(big)
        assert isinstance(view, wire.ChunkView) and view.data.obj is big
    pulled = next(wire.chunk_messages("w", (BIG,), "FP32", data, itemsize=4,
                                      wrap=wire.PULL_CHUNK))
    assert isinstance(_response_parser(rpc.RPCS["Pull"])(pulled), wire.ChunkView)
    small = pb.StepResponse(status=pb.StepStatus(step=2)).SerializeToString()
    assert _response_parser(rpc.RPCS["Step"])(small).status.step == 2
