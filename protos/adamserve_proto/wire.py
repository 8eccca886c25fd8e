"""Hand-written protobuf encoding of the v2 messages that carry tensor bytes.

Both sides (server and client) send tensors and state blobs as messages they
serialise themselves: the tensor's bytes are sliced as memoryviews and copied
once, into the outgoing message, instead of three times through protobuf
objects. The bytes written here are exactly what protobuf's
``SerializeToString`` writes for the same message (tests/transports/test_wire.py
compares them); messages are read back with protobuf's own parser.

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

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = [
    "ADD_TENSORS_INITIAL",
    "COMMIT_PARAM",
    "CREATE_INITIAL",
    "EXPORT_DATA",
    "IMPORT_DATA",
    "MAX_MESSAGE_BYTES",
    "PULL_CHUNK",
    "PUSH_CHUNK",
    "SET_PARAMETERS_VALUE",
    "STEP_CHUNK",
    "STEP_PARAM",
    "MiB",
    "blob_messages",
    "blob_pieces",
    "chunk_messages",
    "field",
    "key",
    "length_delimited",
    "varint",
]

MiB = 1 << 20
# The largest message either side sends: every gRPC receiver accepts 4 MiB by default.
MAX_MESSAGE_BYTES = 4 * MiB
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


# Every field of v2 that carries a TensorChunk: what ``chunk_messages`` wraps chunks in.
CREATE_INITIAL = _tensor_chunk_field(pb.CreateSessionRequest.DESCRIPTOR, "initial")
ADD_TENSORS_INITIAL = _tensor_chunk_field(pb.AddTensorsRequest.DESCRIPTOR, "initial")
SET_PARAMETERS_VALUE = _tensor_chunk_field(pb.SetParametersRequest.DESCRIPTOR, "value")
STEP_CHUNK = _tensor_chunk_field(pb.StepRequest.DESCRIPTOR, "chunk")
PUSH_CHUNK = _tensor_chunk_field(pb.PushRequest.DESCRIPTOR, "chunk")
STEP_PARAM = _tensor_chunk_field(pb.StepResponse.DESCRIPTOR, "param")
COMMIT_PARAM = _tensor_chunk_field(pb.CommitResponse.DESCRIPTOR, "param")
PULL_CHUNK = _tensor_chunk_field(pb.PullResponse.DESCRIPTOR, "chunk")
# The bytes fields that carry a state blob's pieces.
EXPORT_DATA = _bytes_field(pb.ExportStateResponse.DESCRIPTOR, "data")
IMPORT_DATA = _bytes_field(pb.ImportStateRequest.DESCRIPTOR, "data")

_TC = pb.TensorChunk.DESCRIPTOR.fields_by_name
_NAME = _TC["name"].number
_SHAPE = _TC["shape"].number
_DATATYPE = _TC["datatype"].number
_OFFSET = _TC["offset"].number
_DATA = _TC["data"].number


def chunk_messages(name: str, shape: Sequence[int], datatype: str,
                   data: bytes | bytearray | memoryview, *, itemsize: int, offset: int = 0,
                   wrap: FieldDescriptor | None = None,
                   max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[bytes]:
    """Serialised messages of at most ``max_bytes`` each that carry ``data`` as
    ``TensorChunk``s, in order.

    ``data`` holds a whole number of ``itemsize``-byte elements of the tensor
    ``name`` (of ``shape``), starting at element ``offset``; ValueError if it does
    not fit there. Each message is a ``TensorChunk`` or, with ``wrap`` (e.g.
    :data:`STEP_CHUNK`), the message that holds one in that field. An empty
    ``data`` still gives one message (a tensor with no elements, or none sent).
    Fields at their default (empty name, no dimensions, empty datatype, offset 0,
    no data) are left out, as protobuf leaves them out.
    """
    if wrap is not None and wrap.message_type is not pb.TensorChunk.DESCRIPTOR:
        raise TypeError(f"wrap: {wrap.full_name} is not a TensorChunk field")
    if itemsize < 1:
        raise ValueError(f"itemsize must be at least 1, got {itemsize}")
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
    room = (max_bytes - overhead) // itemsize * itemsize
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
