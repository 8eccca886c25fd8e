"""Fused CPU kernels (numba) over one flat buffer per state slot.

Every kernel walks a *block table*: ``(start, end, segment)`` triples that cut the
flat buffers into chunks which never cross a tensor boundary. ``prange`` spreads
the blocks over the cores; inside a block the per-tensor coefficients are loop
constants, so the inner loop is a plain vectorisable pass that reads and writes
each element exactly once. One call updates the whole model.

The arithmetic mirrors torch.optim's single-tensor code operation by operation
(``lerp`` with its two-sided formula, ``addcmul``/``addcdiv`` as
``self + (value*t1) op t2``), so float64 results agree with torch to rounding.
Coefficient matrices arrive in the state dtype, so float32 state is computed in
float32 like torch does.

numba's default ``workqueue`` threading layer aborts when two threads call a
parallel kernel at once (sessions step concurrently), so a thread-safe layer
(TBB or OpenMP) is required before the first kernel runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from numba import njit, prange

from adamserve.engine.backend import F64, Array, Blocks

numba.config.THREADING_LAYER = "threadsafe"

BLOCK = 1 << 15  # elements per block: large enough to amortise scheduling, small enough to balance
# Below this many elements a kernel runs on the calling thread alone: waking the thread
# pool costs more (100+ us) than a small step. numba's thread count is per calling thread,
# so concurrent sessions don't disturb each other.
SERIAL_BELOW = 1 << 17

_JIT = {"parallel": True, "cache": True, "nogil": True, "boundscheck": False}
# Reductions may reassociate (so LLVM vectorises the sum); never assume finite values,
# since the sums are what detects NaN and Inf.
_JIT_SUM = {**_JIT, "fastmath": {"reassoc", "contract"}}


@njit(inline="always")
def _lerp(a, b, w, omw):  # type: ignore[no-untyped-def]
    # torch's lerp: the form used depends on which side of 0.5 the weight is.
    # ``omw`` = 1 - w, computed in the state dtype (a float64 literal would widen the
    # whole expression to float64 in float32 kernels).
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * omw


@njit(**_JIT_SUM)
def segment_sumsq(x, bstart, bend, bseg, nseg):  # type: ignore[no-untyped-def]
    """Sum of squares per segment, accumulated in float64 (non-finite values propagate)."""
    nb = bstart.shape[0]
    partial = np.zeros(nb, dtype=np.float64)
    for b in prange(nb):
        acc = 0.0
        lo, hi = bstart[b], bend[b]
        x_ = x[lo:hi]
        for i in range(hi - lo):
            xi = np.float64(x_[i])
            acc += xi * xi
        partial[b] = acc
    out = np.zeros(nseg, dtype=np.float64)
    for b in range(nb):
        out[bseg[b]] += partial[b]
    return out


@njit(**_JIT_SUM)
def _copy_sumsq(dst, src, block):  # type: ignore[no-untyped-def]
    n = src.shape[0]
    nb = (n + block - 1) // block
    partial = np.zeros(nb, dtype=np.float64)
    for b in prange(nb):
        lo = b * block
        hi = min(lo + block, n)
        d = dst[lo:hi]
        s = src[lo:hi]
        acc = 0.0
        for i in range(hi - lo):
            x = s[i]
            d[i] = x
            acc += np.float64(x) * np.float64(x)
        partial[b] = acc
    return partial.sum()


def copy_sumsq(dst: npt.NDArray[Any], src: npt.NDArray[Any]) -> float:
    """``dst[:] = src`` and the sum of squares of ``src`` (float64), in one pass."""
    with _threads_for(src.shape[0]):
        return float(_copy_sumsq(dst, src, BLOCK))


@njit(**_JIT)
def adam(p, g, m, v, vmax, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, wd, decay, w, b2, omb2, step_size, bc2s, eps, ams = (
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9])
        neg = -step_size
        omw = c[c.shape[0] - 1] - w
        lo, hi = bstart[b], bend[b]
        pb, gb, mb, vb = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        if ams != 0:
            xb = vmax[lo:hi]
            for i in range(hi - lo):
                pi = pb[i]
                gi = gb[i] * gs + wd * pi
                pi = pi * decay
                mi = _lerp(mb[i], gi, w, omw)
                vi = vb[i] * b2 + omb2 * gi * gi
                mb[i] = mi
                vb[i] = vi
                vi = max(xb[i], vi)
                xb[i] = vi
                pb[i] = pi + neg * mi / (math.sqrt(vi) / bc2s + eps)
        else:
            for i in range(hi - lo):
                pi = pb[i]
                gi = gb[i] * gs + wd * pi
                pi = pi * decay
                mi = _lerp(mb[i], gi, w, omw)
                vi = vb[i] * b2 + omb2 * gi * gi
                mb[i] = mi
                vb[i] = vi
                pb[i] = pi + neg * mi / (math.sqrt(vi) / bc2s + eps)


@njit(**_JIT)
def nadam(p, g, m, v, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, wd, decay, w, b2, omb2, bc2, eps, cg, cm = (
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9])
        omw = c[c.shape[0] - 1] - w
        lo, hi = bstart[b], bend[b]
        g_ = g[lo:hi]
        m_ = m[lo:hi]
        p_ = p[lo:hi]
        v_ = v[lo:hi]
        for i in range(hi - lo):
            pi = p_[i]
            gi = g_[i] * gs + wd * pi
            pi = pi * decay
            mi = _lerp(m_[i], gi, w, omw)
            vi = v_[i] * b2 + omb2 * gi * gi
            m_[i] = mi
            v_[i] = vi
            d = math.sqrt(vi / bc2) + eps
            pi = pi + cg * gi / d
            p_[i] = pi + cm * mi / d


@njit(**_JIT)
def radam(p, g, m, v, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, wd, decay, w, b2, omb2, bc1, lr, rectify, rect, bc2s, eps = (
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11])
        omw = c[c.shape[0] - 1] - w
        lo, hi = bstart[b], bend[b]
        g_ = g[lo:hi]
        m_ = m[lo:hi]
        p_ = p[lo:hi]
        v_ = v[lo:hi]
        for i in range(hi - lo):
            pi = p_[i]
            gi = g_[i] * gs + wd * pi
            pi = pi * decay
            mi = _lerp(m_[i], gi, w, omw)
            vi = v_[i] * b2 + omb2 * gi * gi
            m_[i] = mi
            v_[i] = vi
            if rectify != 0:
                p_[i] = pi - (mi / bc1) * lr * (bc2s / (math.sqrt(vi) + eps)) * rect
            else:
                p_[i] = pi - (mi / bc1) * lr


@njit(**_JIT)
def adamax(p, g, m, u, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, wd, w, b2, eps, clr = c[0], c[1], c[3], c[4], c[5], c[6]
        neg = -clr
        omw = c[c.shape[0] - 1] - w
        lo, hi = bstart[b], bend[b]
        g_ = g[lo:hi]
        m_ = m[lo:hi]
        p_ = p[lo:hi]
        u_ = u[lo:hi]
        for i in range(hi - lo):
            pi = p_[i]
            gi = g_[i] * gs + wd * pi
            mi = _lerp(m_[i], gi, w, omw)
            ui = max(u_[i] * b2, abs(gi) + eps)
            m_[i] = mi
            u_[i] = ui
            p_[i] = pi + neg * mi / ui


@njit(**_JIT)
def adagrad(p, g, s, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, wd, clr, eps = c[0], c[1], c[3], c[4]
        neg = -clr
        lo, hi = bstart[b], bend[b]
        g_ = g[lo:hi]
        p_ = p[lo:hi]
        s_ = s[lo:hi]
        for i in range(hi - lo):
            pi = p_[i]
            gi = g_[i] * gs + wd * pi
            si = s_[i] + gi * gi
            s_[i] = si
            p_[i] = pi + neg * gi / (math.sqrt(si) + eps)


@njit(**_JIT)
def rmsprop(p, g, sq, buf, gavg, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, wd, alpha, oma, centered, eps, mom, lr = (
            c[0], c[1], c[3], c[4], c[5], c[6], c[7], c[8])
        neg = -lr
        omo = c[c.shape[0] - 1] - oma
        lo, hi = bstart[b], bend[b]
        buf_ = buf[lo:hi]
        g_ = g[lo:hi]
        gavg_ = gavg[lo:hi]
        p_ = p[lo:hi]
        sq_ = sq[lo:hi]
        for i in range(hi - lo):
            pi = p_[i]
            gi = g_[i] * gs + wd * pi
            si = sq_[i] * alpha + oma * gi * gi
            sq_[i] = si
            if centered != 0:
                ga = _lerp(gavg_[i], gi, oma, omo)
                gavg_[i] = ga
                avg = math.sqrt(si + (-ga) * ga) + eps
            else:
                avg = math.sqrt(si) + eps
            if mom > 0:
                bi = buf_[i] * mom + gi / avg
                buf_[i] = bi
                p_[i] = pi + neg * bi
            else:
                p_[i] = pi + neg * gi / avg


@njit(**_JIT_SUM)
def lamb_moments(p, g, m, v, bstart, bend, bseg, coef, psq, rsq):  # type: ignore[no-untyped-def]
    """First LAMB pass: moments, and the update r written over the gradient buffer.

    Accumulates per-block sums of squares of p and r (float64) for the trust ratio.
    """
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, b1, omb1, b2, omb2, bc1, bc2, eps, wd = (
            c[0], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10])
        pacc = 0.0
        racc = 0.0
        lo, hi = bstart[b], bend[b]
        g_ = g[lo:hi]
        m_ = m[lo:hi]
        p_ = p[lo:hi]
        v_ = v[lo:hi]
        for i in range(hi - lo):
            pi = p_[i]
            gi = g_[i] * gs
            mi = omb1 * gi + b1 * m_[i]
            vi = omb2 * gi * gi + b2 * v_[i]
            m_[i] = mi
            v_[i] = vi
            ri = (mi / bc1) / (math.sqrt(vi / bc2) + eps) + wd * pi
            g_[i] = ri
            pacc += np.float64(pi) * np.float64(pi)
            racc += np.float64(ri) * np.float64(ri)
        psq[b] = pacc
        rsq[b] = racc


@njit(**_JIT)
def scaled_sub(p, r, bstart, bend, bseg, scale):  # type: ignore[no-untyped-def]
    """p -= scale[segment] * r: LAMB's second pass."""
    for b in prange(bstart.shape[0]):
        neg = -scale[bseg[b]]
        lo, hi = bstart[b], bend[b]
        p_ = p[lo:hi]
        r_ = r[lo:hi]
        for i in range(hi - lo):
            p_[i] = p_[i] + neg * r_[i]


@contextmanager
def _threads_for(size: int) -> Iterator[None]:
    if size >= SERIAL_BELOW:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


class CpuBackend:
    """The :class:`~adamserve.engine.backend.Backend` on NumPy arrays and the kernels above."""

    name = "cpu"
    block = BLOCK

    def memory_bytes(self) -> int:
        """Physical memory of the machine."""
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def zeros(self, n: int, dtype: np.dtype[Any]) -> Array:
        return np.zeros(n, dtype=dtype)

    def to_device(self, host: npt.NDArray[Any]) -> Array:
        return np.ascontiguousarray(host)

    def to_host(self, x: Array) -> npt.NDArray[Any]:
        return np.asarray(x)

    def segment_sumsq(self, x: Array, blocks: Blocks, nseg: int) -> F64:
        with _threads_for(blocks.size):
            return np.asarray(segment_sumsq(x, blocks.start, blocks.end, blocks.seg, nseg))

    def run(self, algorithm: str, slots: dict[str, Array], param: Array, grad: Array,
            blocks: Blocks, coef: Array) -> None:
        with _threads_for(blocks.size):
            self._run(algorithm, slots, param, grad, blocks, coef)

    def _run(self, algorithm: str, slots: dict[str, Array], param: Array, grad: Array,
             blocks: Blocks, coef: Array) -> None:
        a, s, b = algorithm, slots, (blocks.start, blocks.end, blocks.seg)
        empty = _EMPTY[param.dtype.char]
        if a in ("adam", "adamw"):
            adam(param, grad, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq", empty), *b,
                 coef)
        elif a == "nadam":
            nadam(param, grad, s["exp_avg"], s["exp_avg_sq"], *b, coef)
        elif a == "radam":
            radam(param, grad, s["exp_avg"], s["exp_avg_sq"], *b, coef)
        elif a == "adamax":
            adamax(param, grad, s["exp_avg"], s["exp_inf"], *b, coef)
        elif a == "adagrad":
            adagrad(param, grad, s["sum"], *b, coef)
        elif a == "rmsprop":
            rmsprop(param, grad, s["square_avg"], s.get("momentum_buffer", empty),
                    s.get("grad_avg", empty), *b, coef)
        else:
            raise ValueError(f"no CPU kernel for {a!r}")

    def lamb_moments(self, slots: dict[str, Array], param: Array, grad: Array, blocks: Blocks,
                     coef: Array) -> tuple[F64, F64]:
        nb = blocks.start.shape[0]
        psq = np.empty(nb, dtype=np.float64)
        rsq = np.empty(nb, dtype=np.float64)
        with _threads_for(blocks.size):
            lamb_moments(param, grad, slots["exp_avg"], slots["exp_avg_sq"], blocks.start,
                         blocks.end, blocks.seg, coef, psq, rsq)
        return psq, rsq

    def scaled_sub(self, param: Array, update: Array, blocks: Blocks, scale: Array) -> None:
        with _threads_for(blocks.size):
            scaled_sub(param, update, blocks.start, blocks.end, blocks.seg, scale)


_EMPTY = {"f": np.zeros(0, np.float32), "d": np.zeros(0, np.float64)}
