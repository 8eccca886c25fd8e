"""What every wire shares: URLs, hyperparameter values, reassembling chunked tensors,
the state blob, bounded retries and the client's own error messages.

Nothing here knows which wire it serves; the gRPC- and HTTP-specific halves live
in their modules and call these (the message conversions are in
:mod:`~adamserve_client.transports.messages`).
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from adamserve_client import errors
from adamserve_client.tensors import DATATYPES
from adamserve_client.transports import _tls
from adamserve_client.transports.base import (
    Buffer,
    Hyperparameters,
    StateDict,
    WireTensor,
)
from adamserve_proto import state_blob, wire
from adamserve_proto.algorithms import wire_value

T = TypeVar("T")

DEFAULT_GRPC_PORT = 50051

# ---------------------------------------------------------------------------
# URLs


@dataclass(frozen=True)
class ServerAddress:
    scheme: str  # "grpc", "grpcs", "http" or "https" (or "flight", "flight+tls")
    host: str
    port: int

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> ServerAddress:
    """Split ``grpc(s)://host:port`` / ``http(s)://host:port``; ValueError for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("grpc", "grpcs", "http", "https"):
        raise ValueError(f"server URL {url!r}: expected grpc://host:port, grpcs://host:port, "
                         "http://host:port or https://host:port")
    if not parts.hostname:
        raise ValueError(f"server URL {url!r}: no host")
    if scheme in ("grpc", "grpcs") and parts.path not in ("", "/"):
        raise ValueError(f"server URL {url!r}: a {scheme}:// URL has no path")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"server URL {url!r}: {exc}") from None
    if port is None:
        port = {"grpc": DEFAULT_GRPC_PORT, "grpcs": DEFAULT_GRPC_PORT, "http": 80,
                "https": 443}[scheme]
    return ServerAddress(scheme, parts.hostname, port)


# ---------------------------------------------------------------------------
# Hyperparameter groups: torch's names, betas a pair


def group_from_json(group: Mapping[str, Any]) -> Hyperparameters:
    """A group of the state blob's JSON as the wire's values (:func:`wire_value`)."""
    return {k: wire_value(k, v) for k, v in group.items()}


# ---------------------------------------------------------------------------
# Tensors the server sent in chunks


_POOL_BYTES = 1 << 20  # buffers from this size up come from Arrow's pool, when it is there


@functools.cache
def _arrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        return None
    return pyarrow


def new_buffer(size: int) -> memoryview:
    """A writable, uninitialised buffer of ``size`` bytes. Large ones come from Arrow's
    memory pool when pyarrow is installed: it keeps freed pages mapped, and filling
    pages the system maps afresh (what a large NumPy or bytes allocation gets) costs
    several times the copy itself."""
    pa = _arrow() if size >= _POOL_BYTES else None
    if pa is not None:
        return memoryview(pa.allocate_buffer(size)).cast("B")
    return np.empty(size, dtype=np.uint8).data


class ChunkAssembler:
    """Collects the chunks of named tensors (in order, per tensor) into whole tensors,
    copying each chunk's data once, into its tensor's buffer, as it arrives (so the
    message it came in can be freed); a tensor that came in one chunk keeps that
    chunk's data as it is."""

    def __init__(self) -> None:
        self._order: list[str] = []
        # name -> shape, datatype, the data, bytes filled
        self._parts: dict[str, tuple[tuple[int, ...], str, Buffer, int]] = {}
        # row-sparse tensors: name -> shape, datatype, [(row indices, values)]
        self._rows: dict[str, tuple[tuple[int, ...], str, list[tuple[Buffer, Buffer]]]] = {}

    def add_rows(self, name: str, shape: Sequence[int], datatype: str, rows: Buffer,
                 data: Buffer) -> None:
        """A row-sparse chunk: some rows of tensor ``name`` (their indices and values)."""
        if datatype not in DATATYPES:
            raise bad_response(f"server sent tensor {name!r} as unknown datatype "
                               f"{datatype!r}")
        dims = tuple(int(d) for d in shape)
        entry = self._rows.get(name)
        if entry is None:
            if name in self._parts:
                raise bad_response(f"server sent tensor {name!r} both whole and as rows")
            entry = self._rows[name] = (dims, datatype, [])
            self._order.append(name)
        if entry[:2] != (dims, datatype):
            raise bad_response(f"server sent tensor {name!r} in chunks that disagree")
        count, rest = divmod(memoryview(rows).nbytes, wire.ROW_INDEX_BYTES)
        if not dims or rest or memoryview(data).nbytes != (
                count * wire.row_width(dims) * DATATYPES[datatype].itemsize):
            raise bad_response(f"server sent rows of tensor {name!r} that do not fit its "
                               f"shape {list(dims)}")
        entry[2].append((rows, data))

    def add(self, name: str, shape: Sequence[int], datatype: str, offset: int,
            data: Buffer) -> None:
        if datatype not in DATATYPES:
            raise bad_response(f"server sent tensor {name!r} as unknown datatype "
                               f"{datatype!r}")
        piece = memoryview(data).cast("B")
        entry = self._parts.get(name)
        if entry is None:
            dims = tuple(int(d) for d in shape)
            total = math.prod(dims) * DATATYPES[datatype].itemsize
            if offset == 0 and len(piece) == total:  # the whole tensor: kept, not copied
                self._parts[name] = (dims, datatype, data, total)
                self._order.append(name)
                return
            if offset < 0:
                raise bad_response(f"server sent tensor {name!r} from element {offset}")
            # uninitialised: the chunks must fill it in order (or the tensor is refused)
            entry = (dims, datatype, new_buffer(total), 0)
            self._order.append(name)
        dims, kind, buf, filled = entry
        if kind != datatype or not isinstance(buf, memoryview) or len(buf) == filled:
            raise bad_response(f"server sent tensor {name!r} in chunks that disagree")
        lo = int(offset) * DATATYPES[datatype].itemsize
        if lo != filled:  # in order, each byte once: nothing is left unwritten
            raise bad_response(f"server sent tensor {name!r} from byte {lo}, expected "
                               f"{filled}")
        if lo + len(piece) > len(buf):
            raise bad_response(f"server sent tensor {name!r} past its end")
        buf[lo:lo + len(piece)] = piece
        self._parts[name] = (dims, datatype, buf, filled + len(piece))

    def add_chunk(self, chunk: Any) -> None:
        """Add a ``TensorChunk`` message (or an ``adamserve_proto.wire.ChunkView``)."""
        if chunk.row_sparse:
            self.add_rows(chunk.name, chunk.shape, chunk.datatype or "FP32", chunk.rows,
                          chunk.data)
            return
        if chunk.name in self._rows:
            raise bad_response(f"server sent tensor {chunk.name!r} both whole and as rows")
        self.add(chunk.name, chunk.shape, chunk.datatype or "FP32", chunk.offset, chunk.data)

    def tensors(self) -> list[WireTensor]:
        out = []
        for name in self._order:
            if name in self._rows:
                dims, kind, parts = self._rows[name]
                if len(parts) == 1:
                    rows, data = parts[0]
                else:
                    rows = b"".join(bytes(r) for r, _ in parts)
                    data = b"".join(bytes(d) for _, d in parts)
                out.append(WireTensor(name, dims, kind, data, rows))
                continue
            shape, datatype, data, filled = self._parts[name]
            total = math.prod(shape) * DATATYPES[datatype].itemsize
            if filled != total:
                raise bad_response(f"server sent {filled} of tensor {name!r}'s "
                                   f"{total} bytes")
            out.append(WireTensor(name, shape, datatype, data))
        return out


# ---------------------------------------------------------------------------
# The state blob (its layout: adamserve_proto.state_blob), as safetensors bytes written
# and read here by hand: an 8-byte header length, a JSON header, raw little-endian bytes.

_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    # the native form's stored moments: int8 codes and bfloat16 bits
    "U8": np.dtype("u1"), "U16": np.dtype("<u2"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def encode_state(sd: Mapping[str, Any]) -> bytes:
    """A torch-format state_dict of NumPy arrays (or numbers) as the wire's blob."""
    tensors, metadata = state_blob.state_parts(sd)
    header: dict[str, Any] = {}
    arrays: list[np.ndarray[Any, Any]] = []
    offset = 0
    for name, value in tensors.items():
        arr = np.asarray(value)
        if arr.dtype.newbyteorder("<") not in _ST_NAMES:
            arr = arr.astype(np.float32)
        # np.require keeps a 0-d array 0-d (np.ascontiguousarray makes it 1-d)
        arr = np.require(arr, dtype=arr.dtype.newbyteorder("<"), requirements="C")
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text,
                     *(a.data.cast("B") for a in arrays if a.size)])


def decode_state(blob: Buffer) -> StateDict:
    """The wire's blob as a torch-format state_dict of NumPy arrays (views of ``blob``)."""
    try:
        header, start = state_blob.read_header(blob)
        meta = header.pop("__metadata__", None)
        data = memoryview(blob).cast("B")[start:]
        tensors: dict[str, np.ndarray[Any, Any]] = {}
        for key, desc in header.items():
            dtype = _ST_DTYPES[desc["dtype"]]
            lo, hi = (int(x) for x in desc["data_offsets"])
            shape = tuple(int(d) for d in desc["shape"])
            if hi - lo != math.prod(shape) * dtype.itemsize or hi > len(data):
                raise ValueError(f"tensor {key!r}: bad data_offsets")
            tensors[key] = np.frombuffer(data[lo:hi], dtype=dtype).reshape(shape)
        sd = state_blob.state_dict(tensors, meta)
        groups = [group_from_json({k: v for k, v in g.items()
                                   if k not in ("params", "param_names")})
                  | {"params": [int(i) for i in g.get("params", [])],
                     "param_names": [str(s) for s in g.get("param_names", [])]}
                  for g in sd["param_groups"]]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise bad_response(f"state blob from the server is malformed: {exc!r}") from None
    return {"state": sd["state"], "param_groups": groups}


# ---------------------------------------------------------------------------
# Bounded retries


def with_retries(call: Callable[[], T], retryable: Callable[[BaseException], bool], *,
                 attempts: int = 3, backoff: float = 0.05) -> T:
    """Run ``call``; while it raises what ``retryable`` accepts, retry with exponential
    backoff (``backoff``, 2x, 4x ..., with jitter) up to ``attempts`` calls in all."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if attempt + 1 >= attempts or not retryable(exc):
                raise
        time.sleep(backoff * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# The client's own errors, worded alike on every wire


def check_sizes(payload: Iterable[WireTensor]) -> None:
    """ValueError, before anything is sent, for a tensor whose bytes do not fill its
    shape (every wire checks this first: the same message whatever the wire)."""
    for t in payload:
        size = memoryview(t.data).nbytes
        if t.rows is not None:
            if not t.shape:
                raise ValueError(f"tensor {t.name!r}: a scalar has no rows to send "
                                 "row-sparse")
            count, rest = divmod(memoryview(t.rows).nbytes, wire.ROW_INDEX_BYTES)
            expected = count * wire.row_width(t.shape) * DATATYPES[t.datatype].itemsize
            if rest or size != expected:
                raise ValueError(f"tensor {t.name!r}: {size} bytes of data for "
                                 f"{memoryview(t.rows).nbytes} bytes of int64 row indices; "
                                 f"{count} rows of shape {list(t.shape[1:])} of "
                                 f"{t.datatype} need {expected}")
            continue
        expected = math.prod(t.shape) * DATATYPES[t.datatype].itemsize
        if size != expected:
            raise ValueError(f"tensor {t.name!r}: {size} bytes of data, shape "
                             f"{list(t.shape)} of {t.datatype} needs {expected}")


def bad_response(message: str, url: str | None = None) -> errors.ServerError:
    """The server's answer cannot be read (reason BAD_RESPONSE)."""
    return errors.ServerError(message if url is None else f"{url}: {message}", url=url,
                              reason="BAD_RESPONSE")


def unreachable(url: str, attempts: int, detail: str) -> errors.Unavailable:
    return errors.Unavailable(f"cannot reach the adamserve server at {url} ({attempts} "
                              f"attempts): {detail}{_tls.hint(url, detail)}", url=url,
                              reason="UNAVAILABLE")


def timed_out(url: str, timeout: float | None, detail: str = "") -> errors.DeadlineExceeded:
    return errors.DeadlineExceeded(
        f"{url}: no answer within the timeout of {timeout} s{f' ({detail})' if detail else ''}",
        url=url, reason="DEADLINE_EXCEEDED")
