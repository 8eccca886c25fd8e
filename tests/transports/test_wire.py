"""adamserve_proto.wire writes what protobuf writes; adamserve_proto.rpc is the service's
descriptor, row for row."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from adamserve_proto import rpc, wire
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

CHUNK_FIELDS = [wire.CREATE_INITIAL, wire.ADD_TENSORS_INITIAL, wire.SET_PARAMETERS_VALUE,
                wire.STEP_CHUNK, wire.PUSH_CHUNK, wire.STEP_PARAM, wire.COMMIT_PARAM,
                wire.PULL_CHUNK]


def _wrapper(f: FieldDescriptor) -> type[Message]:
    return getattr(pb, f.containing_type.name)  # type: ignore[no-any-return]


@pytest.mark.parametrize("n", [1, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)])
def test_varint_is_protobufs(n: int) -> None:
    # TensorChunk.offset (int64, field 4) serialises as exactly its tag and the varint
    assert wire.key(4, 0) + wire.varint(n) == pb.TensorChunk(offset=n).SerializeToString()
    assert wire.varint(0) == b"\0"


def test_every_single_tensor_chunk_field_of_v2_is_named() -> None:
    # StepUnary's repeated gradients/params are protobuf's to write; every other field
    # holding one TensorChunk is one wire.py wraps chunks in
    found = {f.full_name for m in pb.DESCRIPTOR.message_types_by_name.values()
             for f in m.fields
             if f.message_type is pb.TensorChunk.DESCRIPTOR and not f.is_repeated}
    assert found == {f.full_name for f in CHUNK_FIELDS}


@pytest.mark.parametrize("wrap", [None, *CHUNK_FIELDS],
                         ids=lambda f: getattr(f, "full_name", "bare"))
def test_chunks_equal_protobuf(wrap: FieldDescriptor | None) -> None:
    data = np.arange(10, dtype=np.float32).tobytes()
    name = "layer.ü"
    max_bytes = 70  # about 54 bytes of framing (see chunk_messages)
    got = list(wire.chunk_messages(name, (2, 5), "FP32", data, itemsize=4, wrap=wrap,
                                   max_bytes=max_bytes))
    assert len(got) > 1
    start = 0
    for raw in got:
        assert len(raw) <= max_bytes
        chunk = pb.TensorChunk.FromString(raw) if wrap is None else getattr(
            _wrapper(wrap).FromString(raw), wrap.name)
        assert chunk.offset == start
        n = len(chunk.data) // 4
        want = pb.TensorChunk(name=name, shape=[2, 5], datatype="FP32", offset=start,
                              data=data[4 * start:4 * (start + n)])
        whole = want if wrap is None else _wrapper(wrap)(**{wrap.name: want})
        assert raw == whole.SerializeToString()
        start += n
    assert start == 10


def test_offset_and_defaults_left_out_as_protobuf_does() -> None:
    # a later piece of a tensor (offset), a scalar (no shape), an empty tensor
    data = np.arange(3, dtype=np.float64).tobytes()
    (raw,) = wire.chunk_messages("t", (8,), "FP64", data, itemsize=8, offset=5,
                                 wrap=wire.STEP_PARAM)
    want = pb.StepResponse(param=pb.TensorChunk(name="t", shape=[8], datatype="FP64", offset=5,
                                                data=data))
    assert raw == want.SerializeToString()
    (scalar,) = wire.chunk_messages("s", (), "", b"\0\0\x80?", itemsize=4)
    assert scalar == pb.TensorChunk(name="s", data=b"\0\0\x80?").SerializeToString()
    (empty,) = wire.chunk_messages("e", (0,), "BF16", b"", itemsize=2, wrap=wire.STEP_PARAM)
    assert empty == pb.StepResponse(param=pb.TensorChunk(name="e", shape=[0], datatype="BF16")
                                    ).SerializeToString()


def test_large_chunks_fit_four_mib() -> None:
    numel = 3_000_005
    data = np.zeros(numel, np.float32)
    msgs = list(wire.chunk_messages("big", (numel,), "FP32", data, itemsize=4,
                                    wrap=wire.STEP_CHUNK))
    assert len(msgs) == math.ceil(numel * 4 / wire.MAX_MESSAGE_BYTES)  # nearly full
    assert max(len(m) for m in msgs) <= wire.MAX_MESSAGE_BYTES
    assert sum(len(pb.StepRequest.FromString(m).chunk.data) for m in msgs) == numel * 4


def test_chunks_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="whole number of 4-byte"):
        list(wire.chunk_messages("x", (4,), "FP32", b"12", itemsize=4))
    with pytest.raises(ValueError, match=r"do not fit shape \[4\]"):
        list(wire.chunk_messages("x", (4,), "FP32", bytes(20), itemsize=4))
    with pytest.raises(ValueError, match="do not fit"):
        list(wire.chunk_messages("x", (4,), "FP32", bytes(8), itemsize=4, offset=3))
    with pytest.raises(TypeError, match="not a TensorChunk"):
        list(wire.chunk_messages("x", (1,), "FP32", bytes(4), itemsize=4,
                                 wrap=wire.EXPORT_DATA))
    with pytest.raises(ValueError, match="no room"):
        list(wire.chunk_messages("x", (1,), "FP32", bytes(4), itemsize=4, max_bytes=20))


@pytest.mark.parametrize("size", [0, 1, 5000])
def test_blob_messages_equal_protobuf(size: int) -> None:
    blob = bytes(range(256)) * (size // 256) + bytes(size % 256)
    msgs = list(wire.blob_messages(blob, max_bytes=2048))
    assert msgs and max(len(m) for m in msgs) <= 2048
    assert b"".join(pb.ExportStateResponse.FromString(m).data for m in msgs) == blob
    for m in msgs:
        piece = pb.ExportStateResponse.FromString(m).data
        assert m == pb.ExportStateResponse(data=piece).SerializeToString()
    imports = list(wire.blob_messages(blob, wire.IMPORT_DATA, max_bytes=2048))
    assert b"".join(pb.ImportStateRequest.FromString(m).data for m in imports) == blob
    assert [bytes(p) for p in wire.blob_pieces(blob, 2048)] == [
        pb.ExportStateResponse.FromString(m).data for m in msgs]


def test_rpc_table_is_the_service_descriptor() -> None:
    service = pb.DESCRIPTOR.services_by_name["OptimizerService"]
    assert rpc.SERVICE_NAME == "adamserve_proto.v2.OptimizerService"
    assert list(rpc.RPCS) == [m.name for m in service.methods]
    for m in service.methods:
        row = rpc.RPCS[m.name]
        assert row.request_type is getattr(pb, m.input_type.name)
        assert row.response_type is getattr(pb, m.output_type.name)
        assert (row.request_streaming, row.response_streaming) == (m.client_streaming,
                                                                    m.server_streaming)
        assert row.path == f"/adamserve_proto.v2.OptimizerService/{m.name}"
    kinds = {name: r.kind for name, r in rpc.RPCS.items()}
    assert kinds["Step"] == "stream_stream" and kinds["CreateSession"] == "stream_unary"
    assert kinds["Pull"] == "unary_stream" and kinds["GetSession"] == "unary_unary"
    assert kinds["Commit"] == "unary_stream" and kinds["StepUnary"] == "unary_unary"
    # the generated stub agrees with the table, method by method
    assert set(rpc.RPCS) == {n for n in dir(pb_grpc.OptimizerServiceServicer)
                             if not n.startswith("_")}


# ---------------------------------------------------------------------------
# the reading side: what protobuf's parser reads, or None


def _fields(c: pb.TensorChunk | wire.ChunkView) -> tuple[object, ...]:
    return (c.name, tuple(c.shape), c.datatype, c.offset, bytes(c.data))


@pytest.mark.parametrize("wrap", CHUNK_FIELDS, ids=lambda f: f.full_name)
def test_read_chunk_message_reads_what_chunk_messages_writes(wrap: FieldDescriptor) -> None:
    data = np.arange(300, dtype=np.float64).tobytes()
    msgs = list(wire.chunk_messages("layer.ü", (3, 100), "FP64", data, itemsize=8, offset=0,
                                    wrap=wrap, max_bytes=700))
    assert len(msgs) > 1
    for raw in msgs:
        view = wire.read_chunk_message(raw, wrap)
        assert view is not None
        assert _fields(view) == _fields(getattr(_wrapper(wrap).FromString(raw), wrap.name))
        assert view.data.obj is raw  # a view into the message, not a copy
    # defaults left out: a scalar, no datatype, negative numbers as int64 reads them
    raw = pb.StepRequest(chunk=pb.TensorChunk(name="s", shape=[-2, 2**40], offset=-(2**63))
                         ).SerializeToString()
    view = wire.read_chunk_message(raw, wire.STEP_CHUNK)
    assert view is not None and _fields(view) == ("s", (-2, 2**40), "", -(2**63), b"")
    empty = wire.read_chunk_message(pb.StepRequest(chunk=pb.TensorChunk()).SerializeToString(),
                                    wire.STEP_CHUNK)
    assert empty is not None and _fields(empty) == ("", (), "", 0, b"")


def _chunk_bytes(**fields: object) -> bytes:
    return pb.TensorChunk(**fields).SerializeToString()  # type: ignore[arg-type]


def _wrapped(payload: bytes, number: int = wire.STEP_CHUNK.number) -> bytes:
    return wire.length_delimited(number, payload)


# Messages protobuf reads (or refuses) that the hand reader leaves to it.
LEFT_TO_PROTOBUF = {
    "another field": pb.StepRequest(header=pb.StepHeader(session_id="s")).SerializeToString(),
    "empty message": b"",
    "two chunks (protobuf merges them)": _wrapped(_chunk_bytes(name="a")) * 2,
    "a field after the chunk": _wrapped(_chunk_bytes(name="a")) + wire.length_delimited(
        1, pb.StepHeader(session_id="s").SerializeToString()),
    "unpacked shape": _wrapped(wire.key(2, 0) + wire.varint(3) + wire.key(2, 0) + wire.varint(4)),
    "a repeated name (the last wins)": _wrapped(wire.length_delimited(1, b"a")
                                                + wire.length_delimited(1, b"b")),
    "an unknown field": _wrapped(_chunk_bytes(name="a") + wire.key(9, 0) + wire.varint(1)),
    "offset as bytes": _wrapped(wire.length_delimited(4, b"\x01")),
    "data as a varint": _wrapped(wire.key(5, 0) + wire.varint(7)),
    "name not UTF-8": _wrapped(wire.length_delimited(1, b"\xff\xfe")),
    "truncated data": _wrapped(_chunk_bytes(name="a", data=b"12345678"))[:-3],
    "a length past the end": _wrapped(wire.key(5) + wire.varint(100) + b"123"),
    "an overlong varint": _wrapped(wire.key(4, 0) + b"\xff" * 10 + b"\x01"),
    "garbage": b"\xff\xff\xff\xff",
}


@pytest.mark.parametrize("case", list(LEFT_TO_PROTOBUF))
def test_read_chunk_message_leaves_the_rest_to_protobuf(case: str) -> None:
    assert wire.read_chunk_message(LEFT_TO_PROTOBUF[case], wire.STEP_CHUNK) is None


def test_read_chunk_message_agrees_with_protobuf_on_mangled_bytes() -> None:
    # every message the hand reader accepts, protobuf reads with the same fields
    rng = np.random.default_rng(5)
    good = [m for wrap in (wire.STEP_CHUNK, wire.STEP_PARAM) for m in wire.chunk_messages(
        "w.é", (4, 6), "BF16", bytes(range(48)), itemsize=2, wrap=wrap, max_bytes=80)]
    accepted = 0
    for _ in range(3000):
        raw = bytearray(good[rng.integers(len(good))])
        for _ in range(rng.integers(1, 4)):
            what = rng.integers(3)
            pos = int(rng.integers(len(raw) + 1))
            if what == 0 and pos < len(raw):
                raw[pos] = int(rng.integers(256))
            elif what == 1:
                del raw[pos:]
            else:
                raw.insert(pos, int(rng.integers(256)))
        blob = bytes(raw)
        view = wire.read_chunk_message(blob, wire.STEP_CHUNK)
        if view is None:
            continue
        accepted += 1
        parsed = pb.StepRequest.FromString(blob)  # raises if the hand reader was too lenient
        assert parsed.WhichOneof("kind") == "chunk"
        assert _fields(view) == _fields(parsed.chunk)
    assert accepted > 100


def test_read_chunks_splits_out_a_repeated_field() -> None:
    header = pb.StepHeader(session_id="s", return_datatype="BF16", sequence=3)
    chunks = [pb.TensorChunk(name=f"t{i}", shape=[i, 2], datatype="FP32",
                             data=bytes(8 * i)) for i in range(3)]
    whole = pb.StepUnaryRequest(header=header, gradients=chunks).SerializeToString()
    # the same message with the header last, as protobuf may read it too
    late = b"".join(wire.length_delimited(2, c.SerializeToString()) for c in chunks) + (
        wire.length_delimited(1, header.SerializeToString()))
    for raw in (whole, late):
        split = wire.read_chunks(raw, wire.STEP_UNARY_GRADIENTS)
        assert split is not None
        rest, views = split
        assert pb.StepUnaryRequest.FromString(rest).header == header
        assert [_fields(v) for v in views] == [_fields(c) for c in chunks]
    assert wire.read_chunks(b"", wire.STEP_UNARY_GRADIENTS) == (b"", [])
    assert wire.read_chunks(wire.key(7, 5) + bytes(4), wire.STEP_UNARY_GRADIENTS) is None
    assert wire.read_chunks(whole[:-1], wire.STEP_UNARY_GRADIENTS) is None
    with pytest.raises(TypeError, match="repeated TensorChunk"):
        wire.read_chunks(whole, wire.STEP_CHUNK)


def test_one_message_per_tensor_for_a_repeated_field() -> None:
    # StepUnary's replies: each tensor whole, however large, as protobuf writes the entry
    data = np.arange(2 * wire.MiB, dtype=np.float32).tobytes()  # 8 MiB: past any max_bytes
    (entry,) = wire.chunk_messages("w", (2 * wire.MiB,), "FP32", data, itemsize=4,
                                   wrap=wire.STEP_UNARY_PARAMS, max_bytes=None)
    status = pb.StepUnaryResponse(status=pb.StepStatus(step=4)).SerializeToString()
    want = pb.StepUnaryResponse(status=pb.StepStatus(step=4), params=[pb.TensorChunk(
        name="w", shape=[2 * wire.MiB], datatype="FP32", data=data)])
    assert status + entry == want.SerializeToString()
    (empty,) = wire.chunk_messages("e", (0,), "FP32", b"", itemsize=4,
                                   wrap=wire.STEP_UNARY_PARAMS, max_bytes=None)
    assert empty == pb.StepUnaryResponse(params=[pb.TensorChunk(name="e", shape=[0],
                                                                datatype="FP32")]
                                         ).SerializeToString()


# ---------------------------------------------------------------------------
# row-sparse chunks


@pytest.mark.parametrize("wrap", [None, *CHUNK_FIELDS],
                         ids=lambda f: getattr(f, "full_name", "bare"))
def test_row_chunks_equal_protobuf_and_read_back(wrap: FieldDescriptor | None) -> None:
    """Whole rows per message, each with its indices, written as protobuf writes them
    (data 5, row_sparse 6, rows 7), and read back as views."""
    rows = np.array([7, 0, 3, 9, 2], dtype="<i8")
    values = np.arange(15, dtype="<f4")  # 5 rows of 3
    got = list(wire.chunk_messages("emb", (10, 3), "FP32", values.tobytes(), itemsize=4,
                                   wrap=wrap, max_bytes=70, rows=rows.tobytes()))
    assert len(got) > 1
    seen: list[int] = []
    for raw in got:
        assert len(raw) <= 70
        chunk = pb.TensorChunk.FromString(raw) if wrap is None else getattr(
            _wrapper(wrap).FromString(raw), wrap.name)
        ids = np.frombuffer(chunk.rows, "<i8").tolist()
        assert chunk.row_sparse and chunk.offset == 0 and len(chunk.data) == 12 * len(ids)
        want = pb.TensorChunk(name="emb", shape=[10, 3], datatype="FP32", row_sparse=True,
                              rows=chunk.rows,
                              data=values[3 * len(seen):3 * (len(seen) + len(ids))].tobytes())
        whole = want if wrap is None else _wrapper(wrap)(**{wrap.name: want})
        assert raw == whole.SerializeToString()
        if wrap is not None:
            view = wire.read_chunk_message(raw, wrap)
            assert view is not None and view.row_sparse
            assert bytes(view.rows) == chunk.rows and bytes(view.data) == chunk.data
        seen += ids
    assert seen == rows.tolist()
    empty = list(wire.chunk_messages("emb", (10, 3), "FP32", b"", itemsize=4, rows=b""))
    assert empty == [pb.TensorChunk(name="emb", shape=[10, 3], datatype="FP32",
                                    row_sparse=True).SerializeToString()]


@pytest.mark.parametrize(("shape", "values", "rows", "message"), [
    ((), b"\0" * 4, b"\0" * 8, "a scalar has no rows"),
    ((4, 2), b"\0" * 12, b"\0" * 8, "12 bytes of values for 1 rows of 8 bytes each"),
    ((4, 2), b"", b"\0" * 5, "not a whole number of 8-byte indices"),
])
def test_row_chunks_that_do_not_fit_are_refused(shape: tuple[int, ...], values: bytes,
                                                rows: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        list(wire.chunk_messages("t", shape, "FP32", values, itemsize=4, rows=rows))
