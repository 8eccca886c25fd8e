"""Wire dtypes (Open Inference Protocol names) and their conversion to state dtypes.

The datatype table and the bf16 rounding are the shared codec's
(:mod:`adamserve_proto.codec`, which the client uses too); this module adds the
server's fused conversions (:mod:`adamserve.engine.kernels_cpu`): a decode that
copies into state while summing the gradient's squares, and BF16 both ways in one
pass (the codec's NumPy rounding takes several).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine.kernels_cpu import bf16_bits_into, bf16_widen_sumsq, copy_sumsq
from adamserve_proto import codec
from adamserve_proto.codec import itemsize

__all__ = ["WIRE_DTYPES", "decode_into", "encode", "encode_buffer", "encode_into", "itemsize"]

WIRE_DTYPES = codec.DATATYPES

_STATE = (np.dtype(np.float32), np.dtype(np.float64))  # what the kernels write and read


def decode_into(out: npt.NDArray[Any], data: bytes | memoryview, datatype: str) -> float:
    """Decode little-endian ``data`` of ``datatype`` into ``out`` (same element count).

    Returns the sum of squares of the decoded values (float64; NaN or Inf when any value
    is), so the non-finite check and clipping norms need no second pass over the gradient.
    ``data`` may sit at any address (a view into a received message).
    """
    raw = np.frombuffer(data, dtype=WIRE_DTYPES[datatype])
    if out.dtype in _STATE and out.flags.c_contiguous:
        if datatype == "BF16":
            return bf16_widen_sumsq(out.reshape(-1), raw)
        if raw.dtype.itemsize <= out.dtype.itemsize and raw.dtype.kind == "f" and (
                raw.dtype.itemsize >= 4):
            # FP32 or FP64 into as wide a buffer: the squares of the stored values
            return copy_sumsq(out.reshape(-1), raw)
    out[...] = codec.decode(data, datatype).reshape(out.shape)
    return copy_sumsq(out, out)


def encode_into(out: npt.NDArray[Any], values: npt.NDArray[Any], datatype: str) -> None:
    """Write ``values`` as ``datatype`` into ``out`` (an array of that datatype's NumPy
    dtype, as many elements): one pass, BF16 rounded by the fused kernel."""
    flat = values.reshape(-1)
    if datatype == "BF16" and flat.dtype in _STATE:
        bf16_bits_into(out, flat)
    elif datatype == "BF16":
        out[...] = codec.bf16_bits(flat)
    else:
        np.copyto(out, flat, casting="unsafe")


def encode_buffer(values: npt.NDArray[Any], datatype: str) -> memoryview:
    """``values`` as a new buffer of little-endian ``datatype`` bytes (byte-format), owned
    by the caller: a copy even where the dtype already matches, so it keeps the values
    of now. Unlike ``bytes``, a large one is allocated as NumPy allocates (huge pages
    where the system offers them), which is much cheaper to fill."""
    out = np.empty(values.size, dtype=WIRE_DTYPES[datatype])
    encode_into(out, values, datatype)
    return out.data.cast("B")


def encode(values: npt.NDArray[Any], datatype: str) -> bytes:
    """Encode ``values`` as little-endian bytes of ``datatype``."""
    if datatype == "BF16":
        return encode_buffer(values, datatype).tobytes()
    return bytes(codec.encode(values, datatype))
