"""What both transports share: URLs, hyperparameter groups, tensor chunks, the state
blob, session descriptions and bounded retries.

Nothing here knows which wire it serves; the gRPC- and HTTP-specific halves live
in their modules and call these.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from adamserve_client import errors
from adamserve_client.tensors import DATATYPES
from adamserve_client.transports.base import (
    Buffer,
    Hyperparameters,
    HyperValue,
    SessionInfo,
    StateDict,
    TensorSpec,
    WireTensor,
    Workers,
)

T = TypeVar("T")

MiB = 1 << 20
# The largest message either side sends: every gRPC receiver accepts 4 MiB by default.
MAX_MESSAGE_BYTES = 4 * MiB
# Room in each chunk message for everything but the tensor bytes.
_HEAD_ROOM = 1024
DEFAULT_GRPC_PORT = 50051

# ---------------------------------------------------------------------------
# URLs


@dataclass(frozen=True)
class ServerAddress:
    scheme: str  # "grpc", "http" or "https"
    host: str
    port: int

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> ServerAddress:
    """Split ``grpc://host:port`` / ``http(s)://host:port``; ValueError for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("grpc", "http", "https"):
        raise ValueError(f"server URL {url!r}: expected grpc://host:port, http://host:port or "
                         "https://host:port")
    if not parts.hostname:
        raise ValueError(f"server URL {url!r}: no host")
    if scheme == "grpc" and parts.path not in ("", "/"):
        raise ValueError(f"server URL {url!r}: a grpc:// URL has no path")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"server URL {url!r}: {exc}") from None
    if port is None:
        port = {"grpc": DEFAULT_GRPC_PORT, "http": 80, "https": 443}[scheme]
    return ServerAddress(scheme, parts.hostname, port)


# ---------------------------------------------------------------------------
# Hyperparameter groups: torch's names, betas a pair


def hyper_value(key: str, value: Any) -> HyperValue:
    """A hyperparameter as the wire takes it: bool, float, or betas as a pair of floats."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, list | tuple):
        return tuple(float(v) for v in value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"hyperparameter {key!r}: expected a number, true/false or a pair of "
                         f"numbers, got {value!r}") from None


def split_betas(group: Mapping[str, HyperValue]) -> tuple[dict[str, float], dict[str, bool]]:
    """A group as the proto's ``values`` and ``flags`` (betas as beta1/beta2)."""
    values: dict[str, float] = {}
    flags: dict[str, bool] = {}
    for key, value in group.items():
        if isinstance(value, bool):
            flags[key] = value
        elif isinstance(value, tuple):
            if key != "betas" or len(value) != 2:
                raise ValueError(f"hyperparameter {key!r}: only betas may be a pair, "
                                 f"got {value!r}")
            values["beta1"], values["beta2"] = float(value[0]), float(value[1])
        else:
            values[key] = float(value)
    return values, flags


def join_betas(values: Mapping[str, float], flags: Mapping[str, bool]) -> Hyperparameters:
    """The proto's ``values`` and ``flags`` as one torch-style group."""
    out: Hyperparameters = {}
    for key, v in values.items():
        if key == "beta1":
            out["betas"] = (float(v), float(values.get("beta2", 0.0)))
        elif key != "beta2":
            out[key] = float(v)
    out.update({k: bool(v) for k, v in flags.items()})
    return out


def group_to_json(group: Mapping[str, HyperValue]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}


def group_from_json(group: Mapping[str, Any]) -> Hyperparameters:
    return {k: hyper_value(k, v) for k, v in group.items()}


def tensor_spec_to_json(t: TensorSpec) -> dict[str, Any]:
    """A tensor declaration in its JSON form (the HTTP body's ``TensorSpecIn``)."""
    return {"name": t.name, "shape": list(t.shape), "group": t.group}


def session_info_from_json(d: Mapping[str, Any]) -> SessionInfo:
    """A session description in its JSON form (the HTTP body's ``SessionOut``)."""
    return SessionInfo(
        session_id=str(d["id"]),
        algorithm=str(d["algorithm"]),
        dtype=str(d["dtype"]),
        step=int(d["step"]),
        tensors=tuple(TensorSpec(str(t["name"]), tuple(int(x) for x in t["shape"]),
                                 int(t.get("group", 0))) for t in d["tensors"]),
        groups=tuple(group_from_json(g) for g in d["groups"]),
        lr=tuple(float(x) for x in d["lr"]),
        schedule=d.get("schedule"),
        max_grad_norm=None if d.get("max_grad_norm") is None else float(d["max_grad_norm"]),
        clip_per_tensor=bool(d.get("clip_per_tensor", False)),
        skip_nonfinite=bool(d.get("skip_nonfinite", True)),
        state_bytes=int(d.get("state_bytes", 0)),
        checkpointed_step=int(d.get("checkpointed_step", -1)),
        backend=str(d.get("backend", "")),
        workers=workers_from_json(d.get("workers") or {}),
        labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
    )


def workers_from_json(d: Mapping[str, Any]) -> Workers:
    staleness = d.get("max_staleness")
    return Workers(count=int(d.get("count", 1)), mode=str(d.get("mode", "sync")),
                   straggler_timeout=float(d.get("straggler_timeout", 0.0)),
                   straggler_policy=str(d.get("straggler_policy", "fail")),
                   max_staleness=None if staleness is None else int(staleness),
                   scale_lr_by_staleness=bool(d.get("scale_lr_by_staleness", False)),
                   exchange=bool(d.get("exchange", False)))


# ---------------------------------------------------------------------------
# Tensor chunks (gRPC sends each tensor as messages of at most a few MiB)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def chunk_messages(tensor: WireTensor, wrap_field: int | None = None,
                   max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[bytes]:
    """Serialised ``TensorChunk`` messages of at most ``max_bytes`` covering ``tensor``.

    Written by hand (the bytes are what protobuf's ``SerializeToString`` writes) so a
    tensor's bytes are copied once, into the message, from a memoryview slice.
    ``wrap_field`` nests each chunk as that field of an enclosing message (a
    ``StepRequest``'s ``chunk``, a ``CreateSessionRequest``'s ``initial``).
    """
    item = DATATYPES[tensor.datatype].itemsize
    view = memoryview(tensor.data).cast("B")
    expected = math.prod(tensor.shape) * item
    if len(view) != expected:
        raise ValueError(f"tensor {tensor.name!r}: {len(view)} bytes of data, shape "
                         f"{list(tensor.shape)} of {tensor.datatype} needs {expected}")
    name = tensor.name.encode()
    head_fixed = b""
    if name:
        head_fixed += _field(1, name)
    if tensor.shape:
        head_fixed += _field(2, b"".join(_varint(d) for d in tensor.shape))
    head_fixed += _field(3, tensor.datatype.encode())
    room = max_bytes - _HEAD_ROOM - len(head_fixed)
    step = max(1, room // item) * item
    starts = range(0, len(view), step) if len(view) else range(1)
    for start in starts:
        piece = view[start:start + step]
        head = head_fixed
        offset = start // item
        if offset:
            head += _varint(4 << 3) + _varint(offset)
        if len(piece):
            head += _varint(5 << 3 | 2) + _varint(len(piece))
        prefix = (b"" if wrap_field is None
                  else _varint(wrap_field << 3 | 2) + _varint(len(head) + len(piece)))
        yield b"".join((prefix, head, piece))


class ChunkAssembler:
    """Collects the chunks of named tensors (in order, per tensor) into whole tensors."""

    def __init__(self) -> None:
        self._order: list[str] = []
        self._parts: dict[str, tuple[tuple[int, ...], str, list[tuple[int, bytes]]]] = {}

    def add(self, name: str, shape: Sequence[int], datatype: str, offset: int,
            data: bytes) -> None:
        if datatype not in DATATYPES:
            raise errors.ServerError(f"server sent tensor {name!r} as unknown datatype "
                                     f"{datatype!r}")
        entry = self._parts.get(name)
        if entry is None:
            entry = (tuple(int(d) for d in shape), datatype, [])
            self._parts[name] = entry
            self._order.append(name)
        entry[2].append((int(offset), data))

    def tensors(self) -> list[WireTensor]:
        out = []
        for name in self._order:
            shape, datatype, parts = self._parts[name]
            item = DATATYPES[datatype].itemsize
            total = math.prod(shape) * item
            if len(parts) == 1 and parts[0][0] == 0 and len(parts[0][1]) == total:
                data: Buffer = parts[0][1]
            else:
                buf = bytearray(total)
                filled = 0
                for offset, piece in parts:
                    lo = offset * item
                    if lo + len(piece) > total:
                        raise errors.ServerError(f"server sent tensor {name!r} past its end")
                    buf[lo:lo + len(piece)] = piece
                    filled += len(piece)
                if filled != total:
                    raise errors.ServerError(f"server sent {filled} of tensor {name!r}'s "
                                             f"{total} bytes")
                data = buf
            out.append(WireTensor(name, shape, datatype, data))
        return out


def blob_pieces(blob: Buffer, max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[memoryview]:
    """``blob`` in pieces that fit a message."""
    view = memoryview(blob).cast("B")
    step = max_bytes - _HEAD_ROOM
    if not len(view):
        yield view
    for start in range(0, len(view), step):
        yield view[start:start + step]


# ---------------------------------------------------------------------------
# The state blob: one safetensors file (written and read here by hand: an 8-byte
# header length, a JSON header, raw little-endian bytes) holding tensors
# "state.<index>.<slot>" and metadata {"adamserve": "state_dict/1", "json": ...}.

STATE_TAG = "state_dict/1"
# Entries of a parameter's state that are numbers, not tensors.
SCALAR_SLOTS = frozenset({"step", "mu_product"})
_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def encode_state(sd: Mapping[str, Any]) -> bytes:
    """A torch-format state_dict of NumPy arrays (or numbers) as the wire's blob."""
    header: dict[str, Any] = {}
    arrays: list[np.ndarray[Any, Any]] = []
    scalars: dict[str, dict[str, float]] = {}
    offset = 0
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if key in SCALAR_SLOTS:
                scalars.setdefault(str(int(idx)), {})[key] = float(value)
                continue
            arr = np.asarray(value)
            if arr.dtype.newbyteorder("<") not in _ST_NAMES:
                arr = arr.astype(np.float32)
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            header[f"state.{int(idx)}.{key}"] = {
                "dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                "data_offsets": [offset, offset + arr.nbytes]}
            offset += arr.nbytes
            arrays.append(arr)
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    body: dict[str, Any] = {"param_groups": groups, "scalars": scalars}
    if "step_count" in sd:  # one shard's part of a sharded state: the model's step
        body["step_count"] = int(sd["step_count"])
    header["__metadata__"] = {"adamserve": STATE_TAG, "json": json.dumps(body)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text,
                     *(a.data.cast("B") for a in arrays if a.size)])


def decode_state(blob: Buffer) -> StateDict:
    """The wire's blob as a torch-format state_dict of NumPy arrays (views of ``blob``)."""
    view = memoryview(blob).cast("B")
    if len(view) < 8:
        raise errors.ServerError("state blob: fewer than 8 bytes")
    n = int.from_bytes(view[:8], "little")
    if n > len(view) - 8:
        raise errors.ServerError(f"state blob: header of {n} bytes in a blob of {len(view)}")
    try:
        header = json.loads(bytes(view[8:8 + n]))
        meta = header.pop("__metadata__", None) or {}
        if meta.get("adamserve") != STATE_TAG:
            raise ValueError(f"metadata 'adamserve' is not {STATE_TAG!r}")
        body = json.loads(meta["json"])
        data = view[8 + n:]
        state: dict[int, dict[str, Any]] = {}
        for key, desc in header.items():
            kind, idx, slot = key.split(".")
            if kind != "state":
                raise ValueError(f"tensor {key!r} is not named state.<index>.<slot>")
            dtype = _ST_DTYPES[desc["dtype"]]
            lo, hi = (int(x) for x in desc["data_offsets"])
            shape = tuple(int(d) for d in desc["shape"])
            if hi - lo != math.prod(shape) * dtype.itemsize or hi > len(data):
                raise ValueError(f"tensor {key!r}: bad data_offsets")
            arr = np.frombuffer(data[lo:hi], dtype=dtype).reshape(shape)
            state.setdefault(int(idx), {})[slot] = arr
        for idx, entry in body.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update({k: float(v) for k, v in entry.items()})
        groups = [group_from_json({k: v for k, v in g.items()
                                   if k not in ("params", "param_names")})
                  | {"params": [int(i) for i in g.get("params", [])],
                     "param_names": [str(s) for s in g.get("param_names", [])]}
                  for g in body["param_groups"]]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise errors.ServerError(f"state blob from the server is malformed: {exc!r}") from None
    return {"state": dict(sorted(state.items())), "param_groups": groups}


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
