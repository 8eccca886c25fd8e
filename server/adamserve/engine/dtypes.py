"""Wire dtypes (Open Inference Protocol names) and their conversion to state dtypes.

The datatype table and the bf16 rounding are the shared codec's
(:mod:`adamserve_proto.codec`, which the client uses too); this module adds the
server's decode, which fuses the copy into state with the gradient's sum of squares.
"""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from adamserve.engine.kernels_cpu import copy_sumsq
from adamserve_proto import codec
from adamserve_proto.codec import itemsize

__all__ = ["WIRE_DTYPES", "decode_into", "encode", "itemsize"]

WIRE_DTYPES = codec.DATATYPES


def decode_into(out: npt.NDArray[Any], data: bytes | memoryview, datatype: str) -> float:
    """Decode little-endian ``data`` of ``datatype`` into ``out`` (same element count).

    Returns the sum of squares of the decoded values (float64; NaN or Inf when any value
    is), so the non-finite check and clipping norms need no second pass over the gradient.
    """
    values = codec.decode(data, datatype)
    if values.dtype == out.dtype and out.flags.c_contiguous:
        return copy_sumsq(out, values)  # the common case: one fused copy + reduction
    out[...] = values
    return copy_sumsq(out, out)


def encode(values: npt.NDArray[Any], datatype: str) -> bytes:
    """Encode ``values`` as little-endian bytes of ``datatype``."""
    return bytes(codec.encode(values, datatype))
