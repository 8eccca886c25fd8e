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

Tensor bytes are handed to the service as memoryview slices of the request body:
the body is read once and never copied again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from adamserve.engine.dtypes import WIRE_DTYPES, encode
from adamserve.errors import InvalidArgument, ResourceExhausted
from adamserve.service import TensorChunk
from adamserve.transports.http.errors import describe_validation
from adamserve.transports.http.schemas import MAX_DIM, TensorIn

HEADER_LENGTH = "Adamserve-Header-Length"
TRITON_HEADER_LENGTH = "Inference-Header-Content-Length"
OCTET_STREAM = "application/octet-stream"
MAX_ELEMENTS = MAX_DIM  # per tensor: far beyond any device, well inside int64

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
        raise InvalidArgument(f"{HEADER_LENGTH}: expected a whole number of bytes, got {raw!r}")
    return int(text)


def wants_binary(headers: Mapping[str, str], binary_output: bool) -> bool:
    if binary_output:
        return True
    accept = headers.get("accept", "")
    return any(part.split(";")[0].strip().lower() == OCTET_STREAM for part in accept.split(","))


def parse_body(model: type[M], headers: Mapping[str, str], body: bytes,
               max_json_bytes: int) -> tuple[M, memoryview | None]:
    """Split a JSON or binary request body into its model and its binary part.

    Returns ``(request, payload)``; ``payload`` is None for a JSON request and a
    view of the bytes after the header for a binary one.
    """
    n = header_length(headers)
    view = memoryview(body)
    if n is None:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == OCTET_STREAM:
            raise InvalidArgument(
                f"a binary (application/octet-stream) request needs a {HEADER_LENGTH} header "
                "giving the length of its JSON part")
        text, payload = view, None
    else:
        if n > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {n} bytes, beyond the body's {len(body)} bytes")
        text, payload = view[:n], view[n:]
    if len(text) > max_json_bytes:
        raise ResourceExhausted(
            f"the JSON part of the request is {len(text)} bytes; the limit is {max_json_bytes} "
            "(send large tensors in the binary form)")
    raw = bytes(text)
    try:
        request = model.model_validate_json(raw if raw.strip() else b"{}")
    except ValidationError as exc:
        raise InvalidArgument(describe_validation(exc.errors(include_url=False))) from None
    return request, payload


def numel(shape: Sequence[int]) -> int:
    """Elements of ``shape``, as a Python int (no int64 overflow)."""
    return math.prod(shape)


def _numel(t: TensorIn) -> int:
    numel = math.prod(t.shape)
    if numel > MAX_ELEMENTS:
        raise InvalidArgument(
            f"tensor {t.name!r}: shape {t.shape} has {numel} elements; at most {MAX_ELEMENTS}")
    return numel


def _from_numbers(t: TensorIn, data: Sequence[float]) -> bytes:
    values = np.asarray(data, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if t.datatype == "BF16":
            return encode(values.astype(np.float32), "BF16")
        return values.astype(WIRE_DTYPES[t.datatype]).tobytes()


def tensor_chunks(tensors: Sequence[TensorIn], payload: memoryview | None) -> list[TensorChunk]:
    """Check each tensor entry against its data and build the service's chunks."""
    chunks: list[TensorChunk] = []
    seen: set[str] = set()
    pos = 0
    for t in tensors:
        if t.name in seen:
            raise InvalidArgument(f"tensor {t.name!r} appears more than once in the request")
        seen.add(t.name)
        if t.datatype not in WIRE_DTYPES:
            raise InvalidArgument(
                f"tensor {t.name!r}: unknown datatype {t.datatype!r}; expected one of "
                f"{', '.join(WIRE_DTYPES)}")
        numel = _numel(t)
        size = t.parameters.binary_data_size if t.parameters is not None else None
        if size is not None and t.data is not None:
            raise InvalidArgument(
                f"tensor {t.name!r}: give either 'data' or parameters.binary_data_size, not both")
        if size is not None:
            if payload is None:
                raise InvalidArgument(
                    f"tensor {t.name!r}: binary_data_size needs a binary request "
                    f"(Content-Type {OCTET_STREAM} and a {HEADER_LENGTH} header)")
            expected = numel * WIRE_DTYPES[t.datatype].itemsize
            if size != expected:
                raise InvalidArgument(
                    f"tensor {t.name!r}: binary_data_size is {size} bytes; shape {t.shape} of "
                    f"{t.datatype} needs {expected}")
            if pos + size > len(payload):
                raise InvalidArgument(
                    f"tensor {t.name!r}: binary data ends at byte {pos + size} but the body "
                    f"holds {len(payload)} bytes after the JSON header")
            chunks.append(TensorChunk(t.name, tuple(t.shape), t.datatype,
                                      payload[pos:pos + size]))
            pos += size
        elif t.data is not None:
            if len(t.data) != numel:
                raise InvalidArgument(
                    f"tensor {t.name!r}: data has {len(t.data)} values; shape {t.shape} "
                    f"needs {numel}")
            chunks.append(TensorChunk(t.name, tuple(t.shape), t.datatype,
                                      _from_numbers(t, t.data)))
        else:
            raise InvalidArgument(
                f"tensor {t.name!r}: needs 'data' or parameters.binary_data_size")
    if payload is not None and pos != len(payload):
        raise InvalidArgument(
            f"binary data: the tensors' binary_data_size add up to {pos} bytes but the body "
            f"holds {len(payload)} bytes after the JSON header")
    return chunks


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
    if binary:
        return [{"name": c.name, "shape": list(c.shape), "datatype": c.datatype,
                 "parameters": {"binary_data_size": len(c.data)}} for c in chunks]
    return [{"name": c.name, "shape": list(c.shape), "datatype": c.datatype,
             "data": to_numbers(c)} for c in chunks]


class BinaryResponse(Response):
    """A JSON header followed by raw tensor bytes, sent without joining them."""

    media_type = OCTET_STREAM

    def __init__(self, header: bytes, parts: Sequence[bytes | memoryview]) -> None:
        self.parts: list[bytes] = [header, *(bytes(p) if isinstance(p, memoryview) else p
                                             for p in parts)]
        super().__init__(content=None, status_code=200, headers={
            HEADER_LENGTH: str(len(header)),
            TRITON_HEADER_LENGTH: str(len(header)),
        })
        self.headers["content-length"] = str(sum(len(p) for p in self.parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
