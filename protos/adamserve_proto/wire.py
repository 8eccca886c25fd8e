"""Hand-written protobuf encoding of the v2 messages that carry tensor bytes.

Both sides (server and client) send tensors and state blobs as messages they
serialise themselves: the tensor's bytes are sliced as memoryviews and copied
once, into the outgoing message, instead of three times through protobuf
objects. The bytes written here are exactly what protobuf's
``SerializeToString`` writes for the same message (tests/transports/test_wire.py
compares them).

The reading side is here too: :func:`read_chunk_message` reads a message that
carries one chunk (a ``StepRequest``'s ``chunk``, a ``StepResponse``'s ``param``)
without protobuf, its data a memoryview into the received bytes, so the receiver
copies a tensor's bytes once, into place. It reads the form these writers (and
protobuf) write; anything else -- an unknown or repeated field, a packed field sent
unpacked, bytes that do not parse -- it leaves to protobuf's parser, whose answer
(a message, or DecodeError) then stands, so both parsers accept the same messages.

Field numbers come from the v2 descriptors, not from literals. A chunk is
nested in its enclosing message (a ``StepRequest``'s ``chunk``, a
``StepResponse``'s ``param``...) by naming that field: pass one of the
:data:`TensorChunk`-typed fields below (or any such field descriptor) as
``wrap``.

This module knows nothing about numbers: callers give each datatype's item size
(``itemsize``) and the wire's datatype strings as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = [
    "ADD_TENSORS_INITIAL",
    "BY_HAND_BYTES",
    "COMMIT_PARAM",
    "CREATE_INITIAL",
    "EXPORT_DATA",
    "IMPORT_DATA",
    "MAX_MESSAGE_BYTES",
    "PULL_CHUNK",
    "PUSH_CHUNK",
    "ROW_INDEX_BYTES",
    "SET_PARAMETERS_VALUE",
    "STEP_CHUNK",
    "STEP_PARAM",
    "STEP_UNARY_GRADIENTS",
    "STEP_UNARY_PARAMS",
    "ChunkView",
    "MiB",
    "blob_messages",
    "blob_pieces",
    "chunk_messages",
    "field",
    "key",
    "length_delimited",
    "read_chunk_message",
    "read_chunks",
    "read_if_large",
    "row_messages",
    "row_width",
    "split_if_large",
    "varint",
]

MiB = 1 << 20
# The largest message either side sends: every gRPC receiver accepts 4 MiB by default.
MAX_MESSAGE_BYTES = 4 * MiB
# From this size on, a message that carries tensor data is written and read here rather
# than by protobuf: below it protobuf's C code is faster than this module's Python
# (~15 us a message), above it protobuf's copies of the data cost more (measured on
# StepUnary: 4 KiB 5 us by protobuf vs 15 us here; 256 KiB 34 us vs 21 us).
BY_HAND_BYTES = 128 * 1024
# The longest varint: a 64-bit value (negative int64s are sign-extended to 64 bits).
_MAX_VARINT = 10

_WIRE_VARINT = 0
_WIRE_LENGTH_DELIMITED = 2


def varint(n: int) -> bytes:
    """``n`` as a protobuf varint (a negative ``n`` as int64's two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wire_type: int = _WIRE_LENGTH_DELIMITED) -> bytes:
    """A field's tag: its number and wire type."""
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes | memoryview) -> bytes:
    """A length-delimited field (bytes, string, packed repeated, sub-message), whole."""
    return b"".join((key(number), varint(len(payload)), payload))


def field(message: Descriptor, name: str) -> FieldDescriptor:
    """The field ``name`` of a message (its descriptor: ``pb.StepRequest.DESCRIPTOR``);
    KeyError if there is none."""
    if name not in message.fields_by_name:
        raise KeyError(f"{message.full_name} has no field {name!r}")
    return message.fields_by_name[name]


def _tensor_chunk_field(message: Descriptor, name: str) -> FieldDescriptor:
    f = field(message, name)
    if f.message_type is not pb.TensorChunk.DESCRIPTOR:
        raise TypeError(f"{f.full_name} is not a TensorChunk")
    return f


def _bytes_field(message: Descriptor, name: str) -> FieldDescriptor:
    f = field(message, name)
    if f.type != FieldDescriptor.TYPE_BYTES:
        raise TypeError(f"{f.full_name} is not a bytes field")
    return f


# Every field of v2 that carries a TensorChunk: what ``chunk_messages`` wraps chunks in
# (StepUnary's two are repeated: one entry per whole tensor).
CREATE_INITIAL = _tensor_chunk_field(pb.CreateSessionRequest.DESCRIPTOR, "initial")
ADD_TENSORS_INITIAL = _tensor_chunk_field(pb.AddTensorsRequest.DESCRIPTOR, "initial")
SET_PARAMETERS_VALUE = _tensor_chunk_field(pb.SetParametersRequest.DESCRIPTOR, "value")
STEP_CHUNK = _tensor_chunk_field(pb.StepRequest.DESCRIPTOR, "chunk")
PUSH_CHUNK = _tensor_chunk_field(pb.PushRequest.DESCRIPTOR, "chunk")
STEP_PARAM = _tensor_chunk_field(pb.StepResponse.DESCRIPTOR, "param")
COMMIT_PARAM = _tensor_chunk_field(pb.CommitResponse.DESCRIPTOR, "param")
PULL_CHUNK = _tensor_chunk_field(pb.PullResponse.DESCRIPTOR, "chunk")
STEP_UNARY_GRADIENTS = _tensor_chunk_field(pb.StepUnaryRequest.DESCRIPTOR, "gradients")
STEP_UNARY_PARAMS = _tensor_chunk_field(pb.StepUnaryResponse.DESCRIPTOR, "params")
# The bytes fields that carry a state blob's pieces.
EXPORT_DATA = _bytes_field(pb.ExportStateResponse.DESCRIPTOR, "data")
IMPORT_DATA = _bytes_field(pb.ImportStateRequest.DESCRIPTOR, "data")

_TC = pb.TensorChunk.DESCRIPTOR.fields_by_name
_NAME = _TC["name"].number
_SHAPE = _TC["shape"].number
_DATATYPE = _TC["datatype"].number
_OFFSET = _TC["offset"].number
_DATA = _TC["data"].number
_ROW_SPARSE = _TC["row_sparse"].number
_ROWS = _TC["rows"].number
ROW_INDEX_BYTES = 8  # a row index on the wire: int64, little-endian


def chunk_messages(name: str, shape: Sequence[int], datatype: str,
                   data: bytes | bytearray | memoryview, *, itemsize: int, offset: int = 0,
                   wrap: FieldDescriptor | None = None,
                   max_bytes: int | None = MAX_MESSAGE_BYTES,
                   rows: bytes | bytearray | memoryview | None = None) -> Iterator[bytes]:
    """Serialised messages of at most ``max_bytes`` each that carry ``data`` as
    ``TensorChunk``s, in order (``max_bytes`` None: one message, however large -- an
    entry of a repeated field such as :data:`STEP_UNARY_PARAMS`).

    ``data`` holds a whole number of ``itemsize``-byte elements of the tensor
    ``name`` (of ``shape``), starting at element ``offset``; ValueError if it does
    not fit there. Each message is a ``TensorChunk`` or, with ``wrap`` (e.g.
    :data:`STEP_CHUNK`), the message that holds one in that field. An empty
    ``data`` still gives one message (a tensor with no elements, or none sent).
    Fields at their default (empty name, no dimensions, empty datatype, offset 0,
    no data) are left out, as protobuf leaves them out.

    ``rows`` (int64 little-endian row indices): a row-sparse chunk, ``data`` holding
    those rows' values, row after row (see :func:`row_messages`).
    """
    if wrap is not None and wrap.message_type is not pb.TensorChunk.DESCRIPTOR:
        raise TypeError(f"wrap: {wrap.full_name} is not a TensorChunk field")
    if itemsize < 1:
        raise ValueError(f"itemsize must be at least 1, got {itemsize}")
    if rows is not None:
        yield from row_messages(name, shape, datatype, data, rows, itemsize=itemsize,
                                wrap=wrap, max_bytes=max_bytes)
        return
    view = memoryview(data).cast("B")
    if len(view) % itemsize:
        raise ValueError(f"tensor {name!r}: {len(view)} bytes is not a whole number of "
                         f"{itemsize}-byte {datatype or 'FP32'} elements")
    numel = math.prod(shape)
    if offset < 0 or offset + len(view) // itemsize > numel:
        raise ValueError(f"tensor {name!r}: elements {offset} to "
                         f"{offset + len(view) // itemsize} do not fit shape {list(shape)} "
                         f"({numel} elements)")
    head_fixed = b""
    if name:
        head_fixed += length_delimited(_NAME, name.encode())
    if shape:
        head_fixed += length_delimited(_SHAPE, b"".join(varint(d) for d in shape))
    if datatype:
        head_fixed += length_delimited(_DATATYPE, datatype.encode())
    offset_key = key(_OFFSET, _WIRE_VARINT)
    data_key = key(_DATA)
    wrap_key = b"" if wrap is None else key(wrap.number)
    # Everything but the data: the fixed fields, offset and data's tag and length, the
    # wrapper's tag and length (each varint at its longest).
    overhead = (len(head_fixed) + len(offset_key) + len(data_key) + 2 * _MAX_VARINT
                + (len(wrap_key) + _MAX_VARINT if wrap is not None else 0))
    room = (len(view) or itemsize) if max_bytes is None else (
        (max_bytes - overhead) // itemsize * itemsize)
    if room < itemsize:
        raise ValueError(f"tensor {name!r}: max_bytes {max_bytes} leaves no room for one "
                         f"element after {overhead} bytes of framing")
    starts = range(0, len(view), room) if len(view) else range(1)
    for start in starts:
        piece = view[start:start + room]
        head = head_fixed
        first = offset + start // itemsize
        if first:
            head += offset_key + varint(first)
        if len(piece):
            head += data_key + varint(len(piece))
        if wrap is None:
            yield b"".join((head, piece))
        else:
            yield b"".join((wrap_key, varint(len(head) + len(piece)), head, piece))


def row_width(shape: Sequence[int]) -> int:
    """Elements per row of a tensor of ``shape`` (a slice along its first dim)."""
    return math.prod(shape[1:])


def row_messages(name: str, shape: Sequence[int], datatype: str,
                 data: bytes | bytearray | memoryview, rows: bytes | bytearray | memoryview,
                 *, itemsize: int, wrap: FieldDescriptor | None = None,
                 max_bytes: int | None = MAX_MESSAGE_BYTES) -> Iterator[bytes]:
    """Row-sparse ``TensorChunk`` messages (``row_sparse`` set, offset 0) of at most
    ``max_bytes``, that carry the rows ``rows`` (int64 little-endian) of tensor
    ``name`` and their values ``data``, whole rows per message; no rows: one message
    (the tensor still counts as sent). ValueError where ``data`` is not one row of
    ``shape[1:]`` elements per index, or the tensor has no rows (a scalar)."""
    if not shape:
        raise ValueError(f"tensor {name!r}: a scalar has no rows to send row-sparse")
    index = memoryview(rows).cast("B")
    view = memoryview(data).cast("B")
    if len(index) % ROW_INDEX_BYTES:
        raise ValueError(f"tensor {name!r}: {len(index)} bytes of row indices is not a "
                         f"whole number of {ROW_INDEX_BYTES}-byte indices")
    count = len(index) // ROW_INDEX_BYTES
    row_bytes = row_width(shape) * itemsize
    if len(view) != count * row_bytes:
        raise ValueError(f"tensor {name!r}: {len(view)} bytes of values for {count} rows "
                         f"of {row_bytes} bytes each")
    head_fixed = b""
    if name:
        head_fixed += length_delimited(_NAME, name.encode())
    head_fixed += length_delimited(_SHAPE, b"".join(varint(d) for d in shape))
    if datatype:
        head_fixed += length_delimited(_DATATYPE, datatype.encode())
    flag = key(_ROW_SPARSE, _WIRE_VARINT) + b"\x01"
    wrap_key = b"" if wrap is None else key(wrap.number)
    overhead = (len(head_fixed) + len(flag) + len(key(_DATA)) + len(key(_ROWS))
                + 2 * _MAX_VARINT + (len(wrap_key) + _MAX_VARINT if wrap is not None else 0))
    per_row = row_bytes + ROW_INDEX_BYTES
    room = max(count, 1) if max_bytes is None else (max_bytes - overhead) // per_row
    if room < 1:
        raise ValueError(f"tensor {name!r}: max_bytes {max_bytes} leaves no room for one "
                         f"row of {per_row} bytes after {overhead} bytes of framing")
    for first in range(0, count, room) if count else range(1):
        last = min(count, first + room)
        values = view[first * row_bytes:last * row_bytes]
        ids = index[first * ROW_INDEX_BYTES:last * ROW_INDEX_BYTES]
        # protobuf's order: by field number (data 5, row_sparse 6, rows 7)
        parts: list[bytes | memoryview] = [head_fixed]
        if len(values):
            parts += [key(_DATA), varint(len(values)), values]
        parts.append(flag)
        if len(ids):
            parts += [key(_ROWS), varint(len(ids)), ids]
        body = b"".join(parts)
        yield body if wrap is None else b"".join((wrap_key, varint(len(body)), body))


def blob_pieces(blob: bytes | bytearray | memoryview,
                max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[memoryview]:
    """``blob`` in consecutive pieces that each fit a message of ``max_bytes`` together
    with a few fields of framing; an empty blob is one empty piece."""
    view = memoryview(blob).cast("B")
    step = max_bytes - 1024  # room for a session id and the tags
    if step < 1:
        raise ValueError(f"max_bytes {max_bytes} leaves no room for a blob's bytes")
    if not len(view):
        yield view
    for start in range(0, len(view), step):
        yield view[start:start + step]


def blob_messages(blob: bytes | bytearray | memoryview, wrap: FieldDescriptor = EXPORT_DATA,
                  max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[bytes]:
    """Serialised messages of at most ``max_bytes`` that carry ``blob`` in the bytes field
    ``wrap`` (default: ``ExportStateResponse.data``), in order; an empty blob is one
    empty message. A message's other fields are left at their defaults."""
    if wrap.type != FieldDescriptor.TYPE_BYTES:
        raise TypeError(f"wrap: {wrap.full_name} is not a bytes field")
    tag = key(wrap.number)
    for piece in blob_pieces(blob, max_bytes):
        yield b"".join((tag, varint(len(piece)), piece)) if len(piece) else b""


# ---------------------------------------------------------------------------
# Reading


_NO_ROWS = memoryview(b"")


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A ``TensorChunk`` read by hand (:func:`read_chunk_message`, :func:`read_chunks`): its
    fields (protobuf's defaults where absent) and its data as a view into the bytes it
    was read from."""

    name: str
    shape: tuple[int, ...]
    datatype: str
    offset: int
    data: memoryview
    row_sparse: bool = False
    rows: memoryview = _NO_ROWS


_INT64 = 1 << 63
_UINT64 = 1 << 64
_CHUNK_FIELDS = frozenset((_NAME, _SHAPE, _DATATYPE, _OFFSET, _DATA, _ROW_SPARSE, _ROWS))


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos]`` (as uint64) and the position after it; ValueError where
    it runs past ``end`` or 64 bits."""
    result = shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if result >= _UINT64:
                raise ValueError("varint over 64 bits")
            return result, pos
        shift += 7
        if shift >= 7 * _MAX_VARINT:
            break
    raise ValueError("truncated or overlong varint")


def _int64(n: int) -> int:
    return n - _UINT64 if n >= _INT64 else n


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A length-delimited field's payload: (start, stop) within ``end``."""
    size, pos = _varint(buf, pos, end)
    if size > end - pos:
        raise ValueError("length past the end")
    return pos, pos + size


def _text(buf: bytes, start: int, stop: int) -> str:
    # proto3 strings are UTF-8: other bytes are protobuf's to refuse
    return buf[start:stop].decode("utf-8")


def _read_chunk(buf: bytes, pos: int, end: int) -> ChunkView:
    """The TensorChunk in ``buf[pos:end]``; ValueError (or IndexError) for anything but
    each known field at most once, with its own wire type."""
    name = datatype = ""
    shape: tuple[int, ...] = ()
    offset = 0
    data = rows = memoryview(b"")
    row_sparse = False
    seen = 0
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number not in _CHUNK_FIELDS or seen & (1 << number):
            raise ValueError("an unknown or repeated field")
        seen |= 1 << number
        if number == _OFFSET:
            if wire_type != _WIRE_VARINT:
                raise ValueError("offset is not a varint")
            raw, pos = _varint(buf, pos, end)
            offset = _int64(raw)
            continue
        if number == _ROW_SPARSE:
            if wire_type != _WIRE_VARINT:
                raise ValueError("row_sparse is not a varint")
            raw, pos = _varint(buf, pos, end)
            row_sparse = raw != 0
            continue
        if wire_type != _WIRE_LENGTH_DELIMITED:
            raise ValueError("a length-delimited field of another wire type")
        start, pos = _length(buf, pos, end)
        if number == _DATA:
            data = memoryview(buf)[start:pos]
        elif number == _ROWS:
            rows = memoryview(buf)[start:pos]
        elif number == _NAME:
            name = _text(buf, start, pos)
        elif number == _DATATYPE:
            datatype = _text(buf, start, pos)
        else:  # _SHAPE, packed
            dims = []
            while start < pos:
                raw, start = _varint(buf, start, pos)
                dims.append(_int64(raw))
            shape = tuple(dims)
    return ChunkView(name, shape, datatype, offset, data, row_sparse, rows)


def read_chunk_message(buf: bytes, wrap: FieldDescriptor) -> ChunkView | None:
    """The chunk of a serialised message whose one field set is the TensorChunk field
    ``wrap`` (:data:`STEP_CHUNK`, :data:`STEP_PARAM`, ...); None for any other message
    (its other fields, or bytes protobuf's parser must decide on)."""
    if wrap.message_type is not pb.TensorChunk.DESCRIPTOR:
        raise TypeError(f"wrap: {wrap.full_name} is not a TensorChunk field")
    try:
        tag, pos = _varint(buf, 0, len(buf))
        if tag != wrap.number << 3 | _WIRE_LENGTH_DELIMITED:
            return None
        start, stop = _length(buf, pos, len(buf))
        if stop != len(buf):
            return None
        return _read_chunk(buf, start, stop)
    except (ValueError, IndexError):
        return None


def read_chunks(buf: bytes, wrap: FieldDescriptor) -> tuple[bytes, list[ChunkView]] | None:
    """A serialised message split in two: the entries of its repeated TensorChunk field
    ``wrap`` (:data:`STEP_UNARY_GRADIENTS`, ...) read as views, and the message without
    them (bytes for protobuf's parser: the small fields). None where protobuf's parser
    must decide on the whole."""
    if wrap.message_type is not pb.TensorChunk.DESCRIPTOR or not wrap.is_repeated:
        raise TypeError(f"wrap: {wrap.full_name} is not a repeated TensorChunk field")
    chunks = []
    rest = []
    pos, end = 0, len(buf)
    try:
        while pos < end:
            field_start = pos
            tag, pos = _varint(buf, pos, end)
            wire_type = tag & 7
            if wire_type == _WIRE_LENGTH_DELIMITED:
                start, pos = _length(buf, pos, end)
                if tag >> 3 == wrap.number:
                    chunks.append(_read_chunk(buf, start, pos))
                    continue
            elif wire_type == _WIRE_VARINT:
                _, pos = _varint(buf, pos, end)
            else:
                return None  # fixed-width and group fields: not in these messages
            rest.append(buf[field_start:pos])
    except (ValueError, IndexError):
        return None
    return b"".join(rest), chunks


def read_if_large(buf: bytes, wrap: FieldDescriptor) -> ChunkView | None:
    """:func:`read_chunk_message` for a message of at least :data:`BY_HAND_BYTES` (below
    that protobuf's parser is faster: None, as for a message it must decide on)."""
    return read_chunk_message(buf, wrap) if len(buf) >= BY_HAND_BYTES else None


def split_if_large(buf: bytes, wrap: FieldDescriptor
                   ) -> tuple[bytes, list[ChunkView]] | None:
    """:func:`read_chunks` for a message of at least :data:`BY_HAND_BYTES` (else None)."""
    return read_chunks(buf, wrap) if len(buf) >= BY_HAND_BYTES else None
