"""Tensor values <-> the wire's raw little-endian bytes, with NumPy alone.

Datatypes are the Open Inference Protocol's names: FP32, FP64, FP16, BF16. NumPy
has no bfloat16: BF16 travels as the upper 16 bits of a float32, rounded to
nearest even (as torch rounds), NaN kept quiet, and widens back to float32
exactly.

Both sides use it: the client through ``adamserve_client.tensors`` and the server
through ``adamserve.engine.dtypes`` (which adds its fused decode-and-reduce), so
the table of datatypes and the bf16 rounding are written once.
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


def bf16_bits(values: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """float32 values rounded to bfloat16 (nearest even), as raw bits."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():  # a NaN must not round (or truncate) to Inf: keep it, quiet
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def bf16_widen(bits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Raw bfloat16 bits as the float32 values they stand for (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


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
    values = decode(data, datatype)
    if values.size != out.size:
        raise ValueError(f"{values.size} values of {datatype} for an array of {out.size}")
    out[...] = values.reshape(out.shape)
