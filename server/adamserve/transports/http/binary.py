"""Tensor bodies: JSON numbers for small tensors, a binary layout for large ones.

The binary layout is the Triton / Open Inference Protocol binary-data extension:

    request:  Content-Type: application/octet-stream
              Adamserve-Header-Length: N        (Inference-Header-Content-Length: N too)
              body = N bytes of the JSON request, UTF-8
                   + the raw little-endian bytes of every tensor whose JSON entry has
                     "parameters": {"binary_data_size": nbytes}, in the order they
                     appear in the JSON, back to back, nothing after them.

A tensor entry carries either "data" (numbers) or a binary_data_size, never both;
binary_data_size must be prod(shape) * itemsize(datatype), and the sizes must add
up to the body length minus N. Binary responses (``"binary_output": true`` or
``Accept: application/octet-stream``) use the same layout and send the header
length back in ``Adamserve-Header-Length`` (and ``Inference-Header-Content-Length``).

Everything about a body is checked from its JSON part before its tensor bytes are
read (:func:`plan`); the bytes are then handed to the service as they arrive
(:func:`chunks`, reading a :class:`Source`: see :mod:`.body`), in chunks of at most
:data:`PIECE` bytes, so a body is never held whole. Responses are the JSON header
and the result's own buffers, sent one after the other (:class:`BinaryResponse`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from adamserve import metrics
from adamserve.engine.dtypes import WIRE_DTYPES, encode
from adamserve.errors import InvalidArgument, shown
from adamserve.service import TensorChunk
from adamserve.transports.http.errors import describe_validation
from adamserve.transports.http.schemas import MAX_DIM, TensorIn

HEADER_LENGTH = "Adamserve-Header-Length"
TRITON_HEADER_LENGTH = "Inference-Header-Content-Length"
OCTET_STREAM = "application/octet-stream"
MAX_ELEMENTS = MAX_DIM  # per tensor: far beyond any device, well inside int64
# Most bytes of one chunk handed to the service, and about what is received ahead of it
# (a batch: see .body); a multiple of every itemsize.
PIECE = 4 << 20

M = TypeVar("M", bound=BaseModel)

BINARY_LAYOUT = (
    "Binary form (Triton binary-data extension): send Content-Type "
    f"application/octet-stream and header `{HEADER_LENGTH}: N` (or "
    f"`{TRITON_HEADER_LENGTH}: N`). The first N bytes of the body are the JSON request "
    "(the application/json schema); each tensor entry carries "
    '`"parameters": {"binary_data_size": nbytes}` instead of `"data"`, and the raw '
    "little-endian bytes of those tensors follow the JSON, in order, back to back. "
    "nbytes must be prod(shape) * itemsize(datatype) (FP32 4, FP64 8, FP16 2, BF16 2: "
    "the upper 16 bits of a float32) and the sizes must add up to the rest of the body."
)
BINARY_OUTPUT = (
    "With `\"binary_output\": true` or `Accept: application/octet-stream` the response "
    f"is application/octet-stream in the same layout: `{HEADER_LENGTH}: N` gives the "
    "length of the JSON header (the application/json schema, each tensor with "
    "parameters.binary_data_size instead of data), followed by the tensors' raw bytes."
)


def header_length(headers: Mapping[str, str]) -> int | None:
    """The binary header length from the request headers; None for a JSON request."""
    raw = headers.get(HEADER_LENGTH.lower()) or headers.get(TRITON_HEADER_LENGTH.lower())
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not text.isascii() or len(text) > 19:
        raise InvalidArgument(f"{HEADER_LENGTH}: expected a whole number of bytes, got "
                              f"{shown(raw)}")
    return int(text)


def wants_binary(headers: Mapping[str, str], binary_output: bool) -> bool:
    if binary_output:
        return True
    accept = headers.get("accept", "")
    return any(part.split(";")[0].strip().lower() == OCTET_STREAM for part in accept.split(","))


def parse_json(model: type[M], raw: bytes | memoryview) -> M:
    """The JSON part of a body as ``model`` (an empty one: the model's defaults)."""
    text = bytes(raw)
    try:
        return model.model_validate_json(text if text.strip() else b"{}")
    except ValidationError as exc:
        raise InvalidArgument(describe_validation(exc.errors(include_url=False))) from None


def _numel(t: TensorIn) -> int:
    """The elements the entry carries: the whole tensor's, or its rows'."""
    numel = math.prod(t.shape)
    if numel > MAX_ELEMENTS:
        raise InvalidArgument(
            f"tensor {shown(t.name)}: shape {t.shape} has {numel} elements; at most {MAX_ELEMENTS}")
    if t.rows is None:
        return numel
    if not t.shape:
        raise InvalidArgument(f"tensor {shown(t.name)}: a scalar has no rows; send it without "
                              "'rows'")
    return len(t.rows) * math.prod(t.shape[1:])


def row_bytes(rows: Sequence[int]) -> bytes:
    return np.asarray(rows, dtype="<i8").tobytes()


def _from_numbers(t: TensorIn, data: Sequence[float]) -> bytes:
    values = np.asarray(data, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if t.datatype == "BF16":
            return encode(values.astype(np.float32), "BF16")
        return values.astype(WIRE_DTYPES[t.datatype]).tobytes()


@dataclass(frozen=True)
class Entry:
    """A checked tensor entry: ``size`` bytes after the JSON part, or (None) numbers."""

    tensor: TensorIn
    size: int | None


class Source(Protocol):
    """The bytes after the JSON part, read in order (:class:`~.body.Payload`)."""

    @property
    def length(self) -> int | None:
        """How many there are; None when that is known only at the end."""

    @property
    def received(self) -> int:
        """How many have arrived so far."""

    def expect(self, total: int) -> None:
        """The tensors declare ``total`` bytes: nothing past them is asked for."""

    def read(self, n: int, unit: int) -> memoryview:
        """``unit`` to ``n`` bytes, a whole number of ``unit``s; empty at the end."""

    def at_end(self) -> bool:
        """Nothing follows what was read."""


def plan(tensors: Sequence[TensorIn], binary: bool, length: int | None) -> list[Entry]:
    """Check every tensor entry, and the binary sizes against ``length`` (the bytes after
    the JSON part, when known), before any tensor data is read."""
    entries: list[Entry] = []
    seen: set[str] = set()
    pos = 0
    for t in tensors:
        if t.name in seen:
            raise InvalidArgument(f"tensor {shown(t.name)} appears more than once in the request")
        seen.add(t.name)
        if t.datatype not in WIRE_DTYPES:
            raise InvalidArgument(
                f"tensor {shown(t.name)}: unknown datatype {shown(t.datatype)}; expected one of "
                f"{', '.join(WIRE_DTYPES)}")
        numel = _numel(t)
        size = t.parameters.binary_data_size if t.parameters is not None else None
        if size is not None and t.data is not None:
            raise InvalidArgument(
                f"tensor {shown(t.name)}: give either 'data' or parameters.binary_data_size, "
                "not both")
        if size is not None:
            if not binary:
                raise InvalidArgument(
                    f"tensor {shown(t.name)}: binary_data_size needs a binary request "
                    f"(Content-Type {OCTET_STREAM} and a {HEADER_LENGTH} header)")
            expected = numel * WIRE_DTYPES[t.datatype].itemsize
            if size != expected:
                carried = (f"{len(t.rows)} rows of shape {t.shape} of {t.datatype} need"
                           if t.rows is not None else f"shape {t.shape} of {t.datatype} needs")
                raise InvalidArgument(
                    f"tensor {shown(t.name)}: binary_data_size is {size} bytes; {carried} "
                    f"{expected}")
            if length is not None and pos + size > length:
                raise _past_end(t.name, pos + size, length)
            pos += size
        elif t.data is not None:
            if len(t.data) != numel:
                carried = (f"{len(t.rows)} rows of shape {t.shape} need" if t.rows is not None
                           else f"shape {t.shape} needs")
                raise InvalidArgument(
                    f"tensor {shown(t.name)}: data has {len(t.data)} values; {carried} {numel}")
        else:
            raise InvalidArgument(
                f"tensor {shown(t.name)}: needs 'data' or parameters.binary_data_size")
        entries.append(Entry(t, size))
    if binary and length is not None and pos != length:
        raise _beyond(pos, str(length))
    return entries


def _past_end(name: str, end: int, held: int) -> InvalidArgument:
    return InvalidArgument(f"tensor {shown(name)}: binary data ends at byte {end} but the body "
                           f"holds {held} bytes after the JSON header")


def _beyond(total: int, held: str) -> InvalidArgument:
    return InvalidArgument(f"binary data: the tensors' binary_data_size add up to {total} "
                           f"bytes but the body holds {held} bytes after the JSON header")


def chunks(entries: Sequence[Entry], source: Source) -> Iterator[TensorChunk]:
    """The service's chunks of the checked ``entries``: numbers converted, binary data
    read from ``source`` only as the service asks for it, at most :data:`PIECE` bytes
    a chunk. A body that ends early or holds more than its tensors is refused after
    the last chunk, before the service applies anything."""
    total = sum(e.size or 0 for e in entries)
    source.expect(total)
    pos = numbers = 0
    for e in entries:
        t = e.tensor
        shape = tuple(t.shape)
        rows = None if t.rows is None else row_bytes(t.rows)
        if e.size is None:
            assert t.data is not None
            data = _from_numbers(t, t.data)
            numbers += len(data)
            yield TensorChunk(t.name, shape, t.datatype, data, rows=rows)
            continue
        if e.size == 0:  # sent, and empty: the service counts it as sent
            yield TensorChunk(t.name, shape, t.datatype, b"", rows=rows)
        unit = WIRE_DTYPES[t.datatype].itemsize
        if rows is not None:  # whole rows per chunk, each with its indices
            unit *= math.prod(shape[1:])
        done = 0
        while done < e.size:
            view = source.read(min(max(PIECE // unit, 1) * unit, e.size - done), unit)
            if not view:
                raise _past_end(t.name, pos + e.size, source.received)
            if rows is None:
                yield TensorChunk(t.name, shape, t.datatype, view, done // unit)
            else:
                yield TensorChunk(t.name, shape, t.datatype, view,
                                  rows=rows[done // unit * 8:(done + len(view)) // unit * 8])
            done += len(view)
        pos += e.size
    if not source.at_end():
        raise _beyond(total, "more")
    metrics.BYTES_IN.labels("http").inc(total + numbers)


def to_numbers(chunk: TensorChunk) -> list[float]:
    """A chunk's values as Python floats (BF16 widened to float32 exactly)."""
    raw = np.frombuffer(chunk.data, dtype=WIRE_DTYPES[chunk.datatype])
    if chunk.datatype == "BF16":
        values: np.ndarray[Any, Any] = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw
    out: list[float] = values.tolist()
    return out


def tensors_json(chunks: Sequence[TensorChunk], binary: bool) -> list[dict[str, Any]]:
    """Returned tensors as JSON entries: their values as numbers, or (``binary``) their
    binary_data_size, the bytes following the JSON header."""
    out: list[dict[str, Any]] = []
    for c in chunks:
        entry: dict[str, Any] = {"name": c.name, "shape": list(c.shape), "datatype": c.datatype}
        if binary:
            entry["parameters"] = {"binary_data_size": memoryview(c.data).nbytes}
        else:
            entry["data"] = to_numbers(c)
        if c.rows is not None:
            entry["rows"] = np.frombuffer(c.rows, dtype="<i8").tolist()
        out.append(entry)
    return out


class BinaryResponse(Response):
    """A JSON header followed by raw tensor bytes: the parts are sent one after the
    other as they are (bytes or views of the result), never joined or copied."""

    media_type = OCTET_STREAM

    def __init__(self, header: bytes, parts: Sequence[bytes | memoryview]) -> None:
        self.parts = [header, *(memoryview(p).cast("B") if isinstance(p, memoryview) else p
                                for p in parts)]
        super().__init__(status_code=200)
        n = str(len(header)).encode()
        self.raw_headers = [(b"content-type", OCTET_STREAM.encode()),
                            (b"content-length", str(sum(len(p) for p in self.parts)).encode()),
                            (HEADER_LENGTH.lower().encode(), n),
                            (TRITON_HEADER_LENGTH.lower().encode(), n)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        parts = [p for p in self.parts if len(p)] or [b""]
        last = len(parts) - 1
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
