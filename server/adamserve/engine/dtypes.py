"""Wire dtypes (Open Inference Protocol names) and their conversion to state dtypes.

NumPy has no bfloat16: BF16 travels as the upper 16 bits of a float32, and float32
is rounded to it with round-to-nearest-even, as torch does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine.kernels_cpu import copy_sumsq

WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits
}


def itemsize(datatype: str) -> int:
    return WIRE_DTYPES[datatype].itemsize


def decode_into(out: npt.NDArray[Any], data: bytes | memoryview, datatype: str) -> float:
    """Decode little-endian ``data`` of ``datatype`` into ``out`` (same element count).

    Returns the sum of squares of the decoded values (float64; NaN or Inf when any value
    is), so the non-finite check and clipping norms need no second pass over the gradient.
    """
    raw = np.frombuffer(data, dtype=WIRE_DTYPES[datatype])
    if raw.dtype == out.dtype and out.flags.c_contiguous:
        return copy_sumsq(out, raw)  # the common case: one fused copy + reduction
    if datatype == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    out[...] = raw
    return copy_sumsq(out, out)


def encode(values: npt.NDArray[Any], datatype: str) -> bytes:
    """Encode ``values`` as little-endian bytes of ``datatype``."""
    if datatype == "BF16":
        f32 = np.ascontiguousarray(values, dtype=np.float32)
        bits = f32.view(np.uint32)
        # round to nearest even; NaN keeps a quiet-NaN payload
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(f32)
        if nan.any():
            rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
        return rounded.tobytes()
    return np.ascontiguousarray(values, dtype=WIRE_DTYPES[datatype]).tobytes()
