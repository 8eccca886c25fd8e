"""NumPy arrays <-> the wire's raw little-endian bytes.

Datatypes are the Open Inference Protocol's names. NumPy has no bfloat16: BF16
travels as the upper 16 bits of a float32, rounded to nearest even (as torch and
the server round), NaN kept quiet.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATATYPES",
    "WIRE_NAMES",
    "Buffer",
    "decode",
    "decode_into",
    "encode",
    "itemsize",
    "wire_datatype",
]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("adamserve_client needs a little-endian machine")

Buffer = bytes | bytearray | memoryview

# datatype -> how NumPy holds its bytes (BF16 as raw uint16 bits).
DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
# The client's wire_dtype names -> datatypes.
WIRE_NAMES: dict[str, str] = {
    "float32": "FP32",
    "bfloat16": "BF16",
    "float16": "FP16",
    "float64": "FP64",
}


def wire_datatype(name: str) -> str:
    """The datatype for a ``wire_dtype`` name ("float32", "bfloat16", ...)."""
    key = name.lower()
    if key in WIRE_NAMES:
        return WIRE_NAMES[key]
    if name.upper() in DATATYPES:
        return name.upper()
    raise ValueError(f"wire_dtype {name!r}: expected one of {', '.join(WIRE_NAMES)}")


def itemsize(datatype: str) -> int:
    return DATATYPES[datatype].itemsize


def bf16_bits(values: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """float32 values rounded to bfloat16 (nearest even), as raw bits."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def encode(values: npt.NDArray[Any], datatype: str) -> Buffer:
    """``values`` as bytes of ``datatype``; a view, not a copy, when they already are."""
    if datatype == "BF16":
        return bf16_bits(values).data.cast("B")
    arr = np.ascontiguousarray(values, dtype=DATATYPES[datatype])
    return arr.data.cast("B") if arr.size else b""


def decode(data: Buffer, datatype: str) -> npt.NDArray[Any]:
    """The flat values in ``data``: a view for FP32/FP64/FP16, float32 for BF16."""
    raw = np.frombuffer(data, dtype=DATATYPES[datatype])
    if datatype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def decode_into(out: npt.NDArray[Any], data: Buffer, datatype: str) -> None:
    """Write the values in ``data`` into ``out`` (same element count), casting to its dtype."""
    values = decode(data, datatype)
    if values.size != out.size:
        raise ValueError(f"{values.size} values of {datatype} for an array of {out.size}")
    out[...] = values.reshape(out.shape)
