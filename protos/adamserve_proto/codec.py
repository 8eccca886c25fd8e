"""Tensor values <-> the wire's raw little-endian bytes, with NumPy alone.

Datatypes are the Open Inference Protocol's names: FP32, FP64, FP16, BF16. NumPy
has no bfloat16: BF16 travels as the upper 16 bits of a float32, rounded to
nearest even (as torch rounds), NaN kept quiet, and widens back to float32
exactly.

Both sides use it: the client through ``adamserve_client.tensors`` and the server
through ``adamserve.engine.dtypes`` (which adds its fused one-pass kernels, with the
same results), so the table of datatypes and the bf16 rounding are written once.
NumPy has no fused kernels: the bf16 conversions run in blocks that stay in the
cache, so their several passes cost about one pass over memory.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATATYPES",
    "Buffer",
    "bf16_bits",
    "bf16_widen",
    "decode",
    "decode_into",
    "encode",
    "itemsize",
]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("adamserve needs a little-endian machine")

Buffer = bytes | bytearray | memoryview

# datatype -> how NumPy holds its bytes (BF16 as raw uint16 bits).
DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}


def itemsize(datatype: str) -> int:
    return DATATYPES[datatype].itemsize


# Elements per block of the bf16 conversions: their temporaries stay in the L2 cache.
_BLOCK = 1 << 14


def _blocks(n: int) -> range:
    return range(0, n, _BLOCK)


def bf16_bits(values: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """float32 values rounded to bfloat16 (nearest even), as raw bits."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.reshape(-1).view(np.uint32)
    out = np.empty(bits.size, dtype=np.uint16)
    tmp = np.empty(min(bits.size, _BLOCK), dtype=np.uint32)
    odd = np.empty_like(tmp)
    for lo in _blocks(bits.size):
        b = bits[lo:lo + _BLOCK]
        t, o = tmp[:b.size], odd[:b.size]
        # round to nearest even: add just under half an ulp, plus the kept lowest bit
        np.right_shift(b, 16, out=o)
        np.bitwise_and(o, 1, out=o)
        np.add(b, 0x7FFF, out=t)
        np.add(t, o, out=t)
        np.right_shift(t, 16, out=t)
        out[lo:lo + b.size] = t
        nan = np.isnan(f32.reshape(-1)[lo:lo + _BLOCK])
        if nan.any():  # a NaN must not round (or truncate) to Inf: keep it, quiet
            out[lo:lo + b.size][nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return out.reshape(f32.shape)


def bf16_widen(bits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Raw bfloat16 bits as the float32 values they stand for (exact)."""
    out = np.empty(np.shape(bits), dtype=np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def encode(values: npt.NDArray[Any], datatype: str) -> Buffer:
    """``values`` as bytes of ``datatype``; a view, not a copy, when they already are."""
    if datatype == "BF16":
        return bf16_bits(values).data.cast("B")
    arr = np.ascontiguousarray(values, dtype=DATATYPES[datatype])
    return arr.data.cast("B") if arr.size else b""


def decode(data: Buffer, datatype: str) -> npt.NDArray[Any]:
    """The flat values in ``data``: a view for FP32/FP64/FP16, float32 for BF16."""
    raw = np.frombuffer(data, dtype=DATATYPES[datatype])
    return bf16_widen(raw) if datatype == "BF16" else raw


def decode_into(out: npt.NDArray[Any], data: Buffer, datatype: str) -> None:
    """Write the values in ``data`` into ``out`` (same element count), casting to its dtype."""
    raw = np.frombuffer(data, dtype=DATATYPES[datatype])
    if raw.size != out.size:
        raise ValueError(f"{raw.size} values of {datatype} for an array of {out.size}")
    if datatype != "BF16" or not out.flags.c_contiguous:
        out[...] = decode(data, datatype).reshape(out.shape)
    elif out.dtype == np.float32:  # the widened bits straight into place: one pass
        np.left_shift(raw, 16, out=out.reshape(-1).view(np.uint32), dtype=np.uint32)
    else:
        flat = out.reshape(-1)
        for lo in _blocks(raw.size):
            flat[lo:lo + _BLOCK] = bf16_widen(raw[lo:lo + _BLOCK])
