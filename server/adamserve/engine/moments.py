"""How a session keeps its moments: the seam between :class:`FlatOptimizer` and the
storage its ``state_dtype`` picks.

``float32``/``float64``: one flat array per slot in the master dtype (as always).
``bfloat16``: :class:`~adamserve.engine.quantize.Bf16Moments`, 2 bytes per element,
stochastic rounding in every step. ``int8``: :class:`~adamserve.engine.quantize.Int8Moments`,
block-wise 8-bit codes with one float32 scale per 256 elements (tensors of fewer than
4096 elements keep float32 moments). The narrow forms hold the moments of the Adam
family only (:data:`NARROW_ALGORITHMS`), under a float32 master; every reader outside
the kernels goes through :func:`values` (dequantised, the master dtype) or
:func:`native` (the stored form, for checkpoints), and every writer through
:func:`from_values` / :func:`from_native`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine import quantize
from adamserve.engine.algorithms import Algorithm
from adamserve.engine.backend import Backend

I64 = npt.NDArray[np.int64]
Slot = Any  # an Array, a Bf16Moments or an Int8Moments

MASTER_DTYPES = ("float32", "float64")
NARROW_DTYPES = ("bfloat16", "int8")
STATE_DTYPES = (*MASTER_DTYPES, *NARROW_DTYPES)
# torch's Adam, AdamW, AMSGrad (Adam's option), NAdam, RAdam, Adamax and LAMB
NARROW_ALGORITHMS = frozenset({Algorithm.ADAM, Algorithm.ADAMW, Algorithm.NADAM,
                               Algorithm.RADAM, Algorithm.ADAMAX, Algorithm.LAMB})
# the first moment is signed; the second moments (and Adamax's norm) are not
SIGNED_SLOTS = frozenset({"exp_avg"})


def check_state_dtype(state_dtype: str, dtype: str, algorithm: Algorithm) -> str:
    """``state_dtype`` if a session of ``dtype`` and ``algorithm`` can keep its moments
    so; ValueError naming what was wrong and what is expected."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype: expected one of {', '.join(STATE_DTYPES)}, got "
                         f"{state_dtype!r}")
    if state_dtype in MASTER_DTYPES:
        if state_dtype != dtype:
            raise ValueError(f"state_dtype {state_dtype}: the moments are kept in the master "
                             f"dtype ({dtype}) or narrower (bfloat16, int8)")
        return state_dtype
    if dtype != "float32":
        raise ValueError(f"state_dtype {state_dtype}: needs a float32 master (dtype float32), "
                         f"got {dtype}")
    if algorithm not in NARROW_ALGORITHMS:
        names = ", ".join(sorted(a.value for a in NARROW_ALGORITHMS))
        raise ValueError(f"state_dtype {state_dtype}: kept for {names} (and amsgrad); "
                         f"{algorithm.value} keeps its state in the master dtype")
    return state_dtype


def _seed(name: str) -> int:
    """A slot's stochastic-rounding seed: fixed per slot name, so that a session's
    steps are reproducible (the counter, kept in checkpoints, moves it on)."""
    return zlib.crc32(name.encode())


def zeros(state_dtype: str, backend: Backend, name: str, offsets: I64,
          dtype: np.dtype[Any]) -> Slot:
    """A slot of zeros laid out by ``offsets`` (each tensor's part)."""
    size = int(offsets[-1])
    if state_dtype == "int8":
        return quantize.Int8Moments.zeros(offsets, name in SIGNED_SLOTS, backend)
    if state_dtype == "bfloat16":
        return quantize.Bf16Moments.zeros(size, _seed(name), backend)
    return backend.zeros(size, dtype)


def nbytes(slot: Slot) -> int:
    return int(slot.nbytes)


def moment_bytes(state_dtype: str, offsets: I64) -> int:
    """Bytes one slot of this layout takes, before it is allocated."""
    if state_dtype in NARROW_DTYPES:
        return quantize.quantized_nbytes(state_dtype, offsets)
    return int(offsets[-1]) * {"float32": 4, "float64": 8}[state_dtype]


def is_narrow(slot: Slot) -> bool:
    return isinstance(slot, quantize.Int8Moments | quantize.Bf16Moments)


def _on_device(slot: Slot, backend: Backend) -> Slot:
    """A host-built narrow slot with its arrays moved to ``backend``'s device."""
    return slot.moved(backend.to_device)


def _on_host(slot: Slot, backend: Backend) -> Slot:
    return slot.moved(backend.to_host)


def values(slot: Slot, offsets: I64, backend: Backend) -> npt.NDArray[Any]:
    """The slot's values on the host, dequantised (float32) for a narrow slot."""
    if not is_narrow(slot):
        return np.asarray(backend.to_host(slot))
    return quantize.dequantize(_on_host(slot, backend), offsets)


def from_values(state_dtype: str, backend: Backend, name: str, offsets: I64,
                host: npt.NDArray[Any], like: Slot | None = None) -> Slot:
    """A slot holding ``host`` (the master dtype's values, one per element), quantised
    for a narrow ``state_dtype`` (bfloat16: rounded to nearest; ``like``'s rounding
    counter kept)."""
    if state_dtype == "int8":
        v = np.ascontiguousarray(host, dtype=np.float32)
        return _on_device(quantize.quantize_int8(v, offsets, name in SIGNED_SLOTS), backend)
    if state_dtype == "bfloat16":
        slot = quantize.to_bf16(np.ascontiguousarray(host, dtype=np.float32), _seed(name))
        if like is not None:
            slot = dataclasses.replace(slot, seed=like.seed, counter=like.counter)
        return _on_device(slot, backend)
    return backend.to_device(np.ascontiguousarray(host))


def native(slot: Slot, backend: Backend) -> dict[str, npt.NDArray[Any]]:
    """The stored form, on the host, by part name (``""``: a plain slot's one array;
    bfloat16 moments also keep ``rng``, their rounding's seed and counter, so that a
    restored session rounds on as it would have)."""
    if not is_narrow(slot):
        return {"": np.ascontiguousarray(backend.to_host(slot))}
    out = {k: np.ascontiguousarray(v) for k, v in quantize.parts(_on_host(slot, backend)).items()}
    if isinstance(slot, quantize.Bf16Moments):
        out["rng"] = np.array([slot.seed, slot.counter], dtype=np.int64)
    return out


def from_native(state_dtype: str, backend: Backend, name: str, offsets: I64,
                parts: dict[str, npt.NDArray[Any]], dtype: np.dtype[Any]) -> Slot:
    """A slot from its stored form (a checkpoint's); ValueError when the parts do not fit
    this layout and ``state_dtype``."""
    if state_dtype in NARROW_DTYPES:
        parts = dict(parts)
        rng = parts.pop("rng", None)
        seed, counter = _seed(name), 0
        if state_dtype == "bfloat16" and rng is not None:
            if rng.dtype != np.int64 or rng.shape != (2,) or not (
                    0 <= rng[0] < 2**32 and rng[1] >= 0):
                raise ValueError(f"slot {name}: rng must be two int64 (seed < 2**32, counter "
                                 f">= 0), got {rng.shape} {rng.dtype}")
            seed, counter = int(rng[0]), int(rng[1])
        slot = quantize.from_parts(state_dtype, parts, offsets, name in SIGNED_SLOTS, seed,
                                   counter)
        return _on_device(slot, backend)
    arr = parts.get("")
    if arr is None or set(parts) != {""}:
        raise ValueError(f"slot {name}: expected one {dtype} array, got parts {sorted(parts)}")
    if arr.dtype != dtype or arr.shape != (int(offsets[-1]),):
        raise ValueError(f"slot {name}: expected {int(offsets[-1])} {dtype} values, got "
                         f"{arr.shape} {arr.dtype}")
    return backend.to_device(arr)


def grown(state_dtype: str, backend: Backend, name: str, slot: Slot, old: I64, new: I64,
          dtype: np.dtype[Any]) -> Slot:
    """``slot`` (laid out by ``old``) with zeros for the tensors ``new`` appends: the
    stored arrays copied as they are (an int8 slot's codes, scales and small moments of
    the old tensors come first in the new layout too), never requantised."""
    out = zeros(state_dtype, backend, name, new, dtype)
    if not is_narrow(slot):
        out[:len(slot)] = slot  # device to device
        return out
    for f in dataclasses.fields(slot):
        if f.name == "meta":
            continue
        mine = getattr(slot, f.name)
        if hasattr(mine, "shape"):
            getattr(out, f.name)[:len(mine)] = mine
    if isinstance(slot, quantize.Bf16Moments):
        out = dataclasses.replace(out, counter=slot.counter)
    return out


def copy(slot: Slot) -> Slot:
    """An independent copy (LAMB's scratch moments for a two-phase step)."""
    return slot.copy()


# -- one tensor's part, for the native state_dict (STATE_FORMAT_NATIVE) ------------------
# int8: "codes" (uint8, the tensor's elements) and "scale" (float32, one per block of
# QBLOCK), or "" (float32) for a tensor under MIN_QUANTIZED; bfloat16: "bf16" (uint16,
# the bfloat16 bits); a plain slot: "" (the master dtype).


def tensor_native(slot: Slot, offsets: I64, i: int,
                  backend: Backend) -> dict[str, npt.NDArray[Any]]:
    """Tensor ``i``'s part of ``slot`` as stored (host copies, flat)."""
    lo, hi = int(offsets[i]), int(offsets[i + 1])
    if isinstance(slot, quantize.Int8Moments):
        first, small = (int(x) for x in backend.to_host(slot.meta[i])[:2])
        if small >= 0:
            return {"": np.array(backend.to_host(slot.small[small:small + hi - lo]))}
        nblocks = -(-(hi - lo) // quantize.QBLOCK)
        return {"codes": np.array(backend.to_host(slot.codes[lo:hi])),
                "scale": np.array(backend.to_host(slot.scale[first:first + nblocks]))}
    if isinstance(slot, quantize.Bf16Moments):
        return {"bf16": np.array(backend.to_host(slot.bits[lo:hi]))}
    return {"": np.array(backend.to_host(slot[lo:hi]))}


def tensor_values(parts: dict[str, npt.NDArray[Any]], n: int, signed: bool,
                  name: str) -> npt.NDArray[np.float32] | npt.NDArray[Any]:
    """The values one tensor's stored ``parts`` hold (n elements, dequantised); ValueError
    when the parts are not one of the native forms of n elements."""
    one = np.array([0, n], dtype=np.int64)
    keys = set(parts)
    if keys == {"codes", "scale"}:
        codes, scale = parts["codes"].reshape(-1), parts["scale"].reshape(-1)
        nblocks = -(-n // quantize.QBLOCK)
        if codes.dtype != np.uint8 or codes.size != n or scale.dtype != np.float32 or (
                scale.size != nblocks):
            raise ValueError(f"{name}: expected {n} uint8 codes and {nblocks} float32 scales, "
                             f"got {codes.size} {codes.dtype} and {scale.size} {scale.dtype}")
        if n < quantize.MIN_QUANTIZED:
            raise ValueError(f"{name}: a tensor of {n} elements keeps float32 moments "
                             f"(under {quantize.MIN_QUANTIZED}), not codes")
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise ValueError(f"{name}: block scales must be finite and >= 0")
        slot = quantize.from_parts("int8", {"codes": codes, "scale": scale,
                                            "small": np.zeros(0, np.float32)}, one, signed, 0)
        return quantize.dequantize(slot, one)
    if keys == {"bf16"}:
        bits = parts["bf16"].reshape(-1)
        if bits.dtype != np.uint16 or bits.size != n:
            raise ValueError(f"{name}: expected {n} uint16 bfloat16 bits, got {bits.size} "
                             f"{bits.dtype}")
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if keys == {""}:
        return parts[""]
    raise ValueError(f"{name}: expected a tensor, codes and scale, or bf16; got "
                     f"{', '.join(sorted(k or '(tensor)' for k in keys))}")


def kind_of(parts: dict[str, Any]) -> str | None:
    """The narrow state dtype one tensor's stored parts are in (None: a plain tensor)."""
    return {frozenset({"codes", "scale"}): "int8", frozenset({"bf16"}): "bfloat16"}.get(
        frozenset(parts))


def put_tensor_native(slot: Slot, offsets: I64, i: int, parts: dict[str, npt.NDArray[Any]],
                      backend: Backend) -> None:
    """Write tensor ``i``'s stored parts (checked by :func:`tensor_values`, of ``slot``'s
    kind) into ``slot`` as they are: an import of the native form keeps the same bytes
    (requantising the values they stand for need not: a block whose largest magnitude
    is negative has no code of exactly -1)."""
    lo, hi = int(offsets[i]), int(offsets[i + 1])
    if isinstance(slot, quantize.Int8Moments):
        first = int(backend.to_host(slot.meta[i])[0])
        scale = parts["scale"].reshape(-1)
        slot.codes[lo:hi] = backend.to_device(np.ascontiguousarray(parts["codes"].reshape(-1)))
        slot.scale[first:first + scale.size] = backend.to_device(scale)
    elif isinstance(slot, quantize.Bf16Moments):
        slot.bits[lo:hi] = backend.to_device(np.ascontiguousarray(parts["bf16"].reshape(-1)))
