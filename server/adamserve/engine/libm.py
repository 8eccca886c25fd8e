"""The C library's ``pow`` over arrays, for host scalars that must equal XLA's bit for bit.

optax computes its per-step scalars (``1 - b1**t``, Adafactor's ``1 - t**-decay_rate``)
with XLA, whose CPU ``pow`` is the C library's: ``powf`` for float32, ``pow`` for
float64. NumPy's own ``power`` differs from both in the last bit for some arguments,
and a last-bit change of a float32 decay rate moves a float64 Adafactor step by far
more than float64's rounding. numba compiles ``**`` to the same library calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit


@njit(cache=True, nogil=True)
def _power(base, exponent, out):  # type: ignore[no-untyped-def]
    for i in range(out.shape[0]):
        out[i] = base[i] ** exponent[i]


def power(base: npt.ArrayLike, exponent: npt.ArrayLike, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """``base ** exponent`` elementwise (broadcast, 1-D) in ``dtype`` (float32: ``powf``,
    float64: ``pow``), both arguments first rounded to ``dtype``."""
    b, e = np.broadcast_arrays(np.asarray(base, dtype=dtype), np.asarray(exponent, dtype=dtype))
    b, e = np.ascontiguousarray(b.ravel()), np.ascontiguousarray(e.ravel())
    out = np.empty(b.shape, dtype=dtype)
    _power(b, e, out)
    return out
