"""NumPy arrays <-> the wire's raw little-endian bytes, and the client's dtype names.

The codec itself (the datatype table, bf16 rounding and widening, encode/decode) is
the one both sides share, :mod:`adamserve_proto.codec`, re-exported here under the
client's names; this module adds the ``wire_dtype`` names the optimizers take.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adamserve_proto import codec
from adamserve_proto.codec import DATATYPES as DATATYPES
from adamserve_proto.codec import Buffer as Buffer
from adamserve_proto.codec import bf16_bits as bf16_bits
from adamserve_proto.codec import bf16_widen as bf16_widen
from adamserve_proto.codec import decode as decode
from adamserve_proto.codec import decode_into as decode_into
from adamserve_proto.codec import encode as encode
from adamserve_proto.codec import itemsize as itemsize

__all__ = ["WIRE_NAMES", "row_bytes", "wire_datatype"]
__all__ += codec.__all__

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


def row_bytes(rows: Sequence[int] | np.ndarray) -> bytes:
    """Row indices as the wire carries them: int64, little-endian."""
    arr = np.asarray(rows)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"rows: expected a 1-D sequence of integers, got shape "
                         f"{list(arr.shape)} of {arr.dtype}")
    return arr.astype("<i8").tobytes()
