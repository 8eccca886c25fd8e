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

Below :data:`SERIAL_BELOW` elements a call runs the kernel's serial twin (the same
code compiled without ``parallel``): waking the thread pool, or even entering it
with one thread, costs more than a small step.

The wire's BF16 is converted here too, in one pass each way: widening the bits
into the gradient buffer while summing squares, and rounding parameters to
bfloat16 bits (nearest even, NaN kept quiet) exactly as
:func:`adamserve_proto.codec.bf16_bits` does with NumPy.

numba's default ``workqueue`` threading layer aborts when two threads call a
parallel kernel at once (sessions step concurrently), so a thread-safe layer
(TBB or OpenMP) is required before the first kernel runs.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir  # type: ignore[import-untyped]  # numba's own dependency
from numba import njit, prange
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic

from adamserve.engine.backend import F64, Array, Blocks, FactorTasks
from adamserve.engine.muon import newton_schulz

numba.config.THREADING_LAYER = "threadsafe"

BLOCK = 1 << 15  # elements per block: large enough to amortise scheduling, small enough to balance
# Below this many elements a kernel runs serially on the calling thread: waking the thread
# pool costs more (100+ us) than a small step, and entering it with one thread still
# costs ~10 us a call.
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
    return float(_sized(_copy_sumsq, src.shape[0])(dst, src, BLOCK))


# -- bfloat16: the upper half of a float32's bits ---------------------------------------


@intrinsic
def _f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """A float32's bits as a uint32 (a bitcast, not a conversion)."""
    if x != nbtypes.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(sig.return_type))

    return nbtypes.uint32(nbtypes.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the low 32 bits of the integer ``x`` (numba widens
    arithmetic on uint32 to 64 bits)."""
    if not isinstance(x, nbtypes.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        low = args[0]
        if low.type.width > 32:
            low = builder.trunc(low, context.get_value_type(nbtypes.uint32))
        return builder.bitcast(low, context.get_value_type(sig.return_type))

    return nbtypes.float32(x), codegen


@njit(**_JIT_SUM)
def _bf16_widen_sumsq(dst, bits, block):  # type: ignore[no-untyped-def]
    n = bits.shape[0]
    nb = (n + block - 1) // block
    partial = np.zeros(nb, dtype=np.float64)
    for b in prange(nb):
        lo = b * block
        hi = min(lo + block, n)
        d = dst[lo:hi]
        s = bits[lo:hi]
        acc = 0.0
        for i in range(hi - lo):
            x = _bits_f32(np.uint32(s[i]) << 16)  # exact: bf16 is a float32 prefix
            d[i] = x
            acc += np.float64(x) * np.float64(x)
        partial[b] = acc
    return partial.sum()


@njit(**_JIT)
def _bf16_bits(dst, src, block):  # type: ignore[no-untyped-def]
    n = src.shape[0]
    nb = (n + block - 1) // block
    half = np.uint32(16)
    for b in prange(nb):
        lo = b * block
        hi = min(lo + block, n)
        d = dst[lo:hi]
        s = src[lo:hi]
        for i in range(hi - lo):
            u = _f32_bits(np.float32(s[i]))  # float64 rounds to float32 first, as NumPy's cast
            # round to nearest even: add just under half an ulp, plus the kept lowest bit
            r = (u + np.uint32(0x7FFF) + ((u >> half) & np.uint32(1))) >> half
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                r = (u >> half) | np.uint32(0x40)  # a NaN stays a NaN (quiet), never Inf
            d[i] = np.uint16(r)


def bf16_widen_sumsq(dst: npt.NDArray[Any], bits: npt.NDArray[np.uint16]) -> float:
    """``dst[:]`` = the float values of the bfloat16 ``bits`` (exact), and their sum of
    squares (float64), in one pass; ``dst`` is float32 or float64."""
    return float(_sized(_bf16_widen_sumsq, bits.shape[0])(dst, bits, BLOCK))


def bf16_bits_into(dst: npt.NDArray[np.uint16], src: npt.NDArray[Any]) -> None:
    """``dst[:]`` = ``src`` (float32 or float64) rounded to bfloat16 bits, in one pass;
    the same bits as :func:`adamserve_proto.codec.bf16_bits`."""
    _sized(_bf16_bits, src.shape[0])(dst, src, BLOCK)


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


@njit(**_JIT)
def schedule_free(p, g, v, z, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """Schedule-free AdamW and RAdam (schedulefree's step; p holds y), one pass.

    ``adapt`` off (RAdam before rho_t > 4) leaves the gradient unnormalised; ``init``
    (a tensor's first step) starts z as y and the second moment at 0.
    """
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, b2, omb2, bc2, eps, adapt, wd, ckp1, cy, lr, init = (
            c[0], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12])
        omc = c[c.shape[0] - 1] - ckp1
        zero = omc - omc
        lo, hi = bstart[b], bend[b]
        p_ = p[lo:hi]
        g_ = g[lo:hi]
        v_ = v[lo:hi]
        z_ = z[lo:hi]
        for i in range(hi - lo):
            yi = p_[i]
            gi = g_[i] * gs
            zi = yi if init != 0 else z_[i]
            vi = (zero if init != 0 else v_[i]) * b2 + omb2 * gi * gi
            v_[i] = vi
            if adapt != 0:
                gi = gi / (math.sqrt(vi / bc2) + eps)
            if wd != 0:
                gi = gi + wd * yi
            yi = _lerp(yi, zi, ckp1, omc)
            p_[i] = yi + cy * gi
            z_[i] = zi - lr * gi


@njit(**_JIT)
def lerp_into(p, e, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """p = torch.lerp(p, e, w), w = coef[segment, 0]: the schedule-free train()/eval()
    swap. Its weights may be negative, so the form is chosen on |w| as torch does."""
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        w = c[0]
        omw = c[1] - w
        small = abs(w) < 0.5
        lo, hi = bstart[b], bend[b]
        p_ = p[lo:hi]
        e_ = e[lo:hi]
        for i in range(hi - lo):
            a = p_[i]
            d = e_[i] - a
            p_[i] = a + w * d if small else e_[i] - d * omw


@njit(**_JIT)
def muon_momentum(g, buf, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """Muon's momentum (torch's ``buf.lerp_(g, 1-mu)``), and over ``g`` the update the
    Newton-Schulz iteration then orthogonalises: ``g.lerp(buf, mu)`` (nesterov) or buf."""
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, w, mu, nesterov = c[0], c[3], c[4], c[5]
        one = c[c.shape[0] - 1]
        omw = one - w  # torch's 1 - weight, in the state dtype
        ommu = one - mu
        lo, hi = bstart[b], bend[b]
        g_ = g[lo:hi]
        buf_ = buf[lo:hi]
        for i in range(hi - lo):
            gi = g_[i] * gs
            bi = _lerp(buf_[i], gi, w, omw)
            buf_[i] = bi
            g_[i] = _lerp(gi, bi, mu, ommu) if nesterov != 0 else bi


@njit(**_JIT)
def decay_add(p, u, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """p = p·decay + scale·u with (decay, scale) = coef[segment]: torch's
    ``p.mul_(1 - lr·wd)`` then ``p.add_(u, alpha=scale)`` (Muon's apply)."""
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        decay, scale = c[0], c[1]
        lo, hi = bstart[b], bend[b]
        p_ = p[lo:hi]
        u_ = u[lo:hi]
        for i in range(hi - lo):
            p_[i] = p_[i] * decay + scale * u_[i]


@intrinsic
def _prefetch(typingctx, arr, index):  # type: ignore[no-untyped-def]
    """Ask for the cache line of ``arr[index]`` (LLVM's prefetch: for writing, kept in
    every cache level); nothing is read, so an index past the end is harmless."""
    if not isinstance(arr, nbtypes.Array) or not isinstance(index, nbtypes.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        # the typed-pointer name: LLVM 15 and later remangle it for opaque pointers
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return nbtypes.void(arr, index), codegen


# SparseAdam's rows lie anywhere in buffers far larger than the caches: each block asks
# for the first PREFETCH_MOST elements of the block PREFETCH_AHEAD on, so the rows'
# cache misses overlap instead of queueing (1.3-1.7x on the 2-core test machine for
# rows of 64 float32); a long block's rest streams, which the hardware prefetches.
PREFETCH_AHEAD = 8
PREFETCH_MOST = 512


@njit(**_JIT)
def sparse_adam(p, g, m, v, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """SparseAdam over the blocks of the touched rows (engine/sparse_adam.py), in torch's
    order: dm = (g - m)(1-b1), m += dm; dv = (g² - v)(1-b2), v += dv;
    p += -step_size · (m / (sqrt(v) + eps))."""
    nb = bstart.shape[0]
    line = max(1, 64 // p.itemsize)  # elements per 64-byte cache line
    for b in prange(nb):
        if b + PREFETCH_AHEAD < nb:
            ahead = bstart[b + PREFETCH_AHEAD]
            for j in range(ahead, min(bend[b + PREFETCH_AHEAD], ahead + PREFETCH_MOST), line):
                _prefetch(p, j)
                _prefetch(g, j)
                _prefetch(m, j)
                _prefetch(v, j)
        c = coef[bseg[b]]
        gs, omb1, omb2, eps, neg = c[0], c[3], c[4], c[5], c[6]
        lo, hi = bstart[b], bend[b]
        p_, g_, m_, v_ = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        for i in range(hi - lo):
            gi = g_[i] * gs
            mi = m_[i]
            vi = v_[i]
            mi = mi + (gi - mi) * omb1
            vi = vi + (gi * gi - vi) * omb2
            m_[i] = mi
            v_[i] = vi
            p_[i] = p_[i] + neg * (mi / (math.sqrt(vi) + eps))


# -- Adafactor (engine/adafactor.py: the passes, the tables and the coefficient columns) ----


@njit(**_JIT_SUM)
def adafactor_row_sums(g, tasks, coef, out):  # type: ignore[no-untyped-def]
    """Σ (g·gs)² of each row of the factored tensors (float64), at its row_var index.
    tasks: (segment, first element, rows, first row_var index, row length)."""
    for k in prange(tasks.shape[0]):
        gs = coef[tasks[k, 0], 0]
        lo, nrows, r0, m = tasks[k, 1], tasks[k, 2], tasks[k, 3], tasks[k, 4]
        for r in range(nrows):
            g_ = g[lo + r * m:lo + (r + 1) * m]
            acc = 0.0
            for j in range(m):
                x = np.float64(g_[j] * gs)
                acc += x * x
            out[r0 + r] = acc


@njit(**_JIT_SUM)
def adafactor_col_sums(g, tasks, coef, partial):  # type: ignore[no-untyped-def]
    """Per task, Σ (g·gs)² of each column of its stripe over its rows (float64).
    tasks: (segment, first element, rows, columns, row length)."""
    for k in prange(tasks.shape[0]):
        gs = coef[tasks[k, 0], 0]
        lo, nrows, width, m = tasks[k, 1], tasks[k, 2], tasks[k, 3], tasks[k, 4]
        acc = partial[k]
        for j in range(width):
            acc[j] = 0.0
        for r in range(nrows):
            g_ = g[lo + r * m:lo + r * m + width]
            for j in range(width):
                x = np.float64(g_[j] * gs)
                acc[j] += x * x


@njit(**_JIT)
def adafactor_factors(  # type: ignore[no-untyped-def]
        row_var, col_var, row_sums, rows, partial, stripes, batches, coef, means):
    """torch's ``row_var.lerp_(norm(g, dim=-1).square_().div_(m), w)`` and col_var's alike:
    the norm rounded to the state dtype (through the slot itself) before it is squared;
    then per matrix max(mean(row_var), eps1) into ``means``."""
    for k in prange(rows.shape[0]):
        c = coef[rows[k, 0]]
        w, m = c[2], c[5]
        omw = c[8] - w
        r0 = rows[k, 3]
        for r in range(r0, r0 + rows[k, 2]):
            old = row_var[r]
            row_var[r] = math.sqrt(row_sums[r])
            norm = row_var[r]
            row_var[r] = _lerp(old, norm * norm / m, w, omw)
    for k in prange(stripes.shape[0]):
        cs = coef[stripes[k, 0]]
        ws, n = cs[2], cs[6]
        omws = cs[8] - ws
        t0, nt, c0 = stripes[k, 1], stripes[k, 2], stripes[k, 3]
        for j in range(stripes[k, 4]):
            total = 0.0
            for t in range(t0, t0 + nt):
                total += partial[t, j]
            before = col_var[c0 + j]
            col_var[c0 + j] = math.sqrt(total)
            cnorm = col_var[c0 + j]
            col_var[c0 + j] = _lerp(before, cnorm * cnorm / n, ws, omws)
    for k in prange(batches.shape[0]):
        cb = coef[batches[k, 0]]
        eps1, count = cb[3], cb[6]
        first, i = batches[k, 1], batches[k, 3]
        acc = 0.0
        for r in range(first, first + batches[k, 2]):
            acc += row_var[r]
        means[i] = acc  # the sum in the state dtype, then torch's mean and clamp
        mean = means[i] / count
        means[i] = eps1 if mean < eps1 else mean


@njit(**_JIT_SUM)
def adafactor_update(  # type: ignore[no-untyped-def]
        p, g, var, row_var, col_var, means, bstart, bend, bseg, meta, coef, out, apply):
    """U = g·gs · rsqrt(max(v, eps1²)): Σ U² per block into ``out`` (lerping variance,
    the second moment of the tensors of fewer than 2 dims), or with ``apply``
    p = p·decay + scale·U. A factored tensor's v = row_var·col_var / mean, walked row by
    row so that the inner loop runs over consecutive columns."""
    for b in prange(bstart.shape[0]):
        s = bseg[b]
        c = coef[s]
        gs, decay, w, e2, scale, one = c[0], c[1], c[2], c[4], c[7], c[8]
        omw = one - w
        lo, hi = bstart[b], bend[b]
        start = meta[s, 0]
        acc = 0.0
        if meta[s, 1] == 0:
            shift = meta[s, 7] - start
            for i in range(lo, hi):
                gi = g[i] * gs
                if apply:
                    vi = var[i + shift]
                else:
                    vi = _lerp(var[i + shift], gi * gi, w, omw)
                    var[i + shift] = vi
                u = one / math.sqrt(vi if not vi < e2 else e2) * gi
                if apply:
                    p[i] = p[i] * decay + scale * u
                else:
                    acc += np.float64(u) * np.float64(u)
        else:
            m, n = meta[s, 2], meta[s, 3]
            roff, coff, boff = meta[s, 4], meta[s, 5], meta[s, 6]
            e = lo - start
            row = e // m
            col = e - row * m
            while e < hi - start:
                k = min(m - col, hi - start - e)
                mat = row // n
                r = row_var[roff + row]
                rm = means[boff + mat]
                cv = col_var[coff + mat * m + col:coff + mat * m + col + k]
                g_ = g[start + e:start + e + k]
                p_ = p[start + e:start + e + k]
                for j in range(k):
                    vj = r * cv[j] / rm
                    u = one / math.sqrt(vj if not vj < e2 else e2) * (g_[j] * gs)
                    if apply:
                        p_[j] = p_[j] * decay + scale * u
                    else:
                        acc += np.float64(u) * np.float64(u)
                e += k
                row += 1
                col = 0
        out[b] = acc


# -- serial twins -------------------------------------------------------------------------

Kernel = Callable[..., Any]


def _twin(kernel: Any, options: dict[str, Any]) -> Kernel:
    """``kernel`` compiled without ``parallel`` (``prange`` is ``range`` there), under a
    name of its own so that the two never share an on-disk cache entry."""
    fn = kernel.py_func
    serial = types.FunctionType(fn.__code__, fn.__globals__, f"{fn.__name__}_serial",
                                fn.__defaults__, fn.__closure__)
    serial.__qualname__ = f"{fn.__qualname__}_serial"
    # numpy's error model, as the parallel kernels have: a division by zero (eps=0) gives
    # Inf or NaN, never ZeroDivisionError
    return njit(**{**options, "parallel": False, "error_model": "numpy"})(serial)  # type: ignore[no-any-return]


_SERIAL: dict[Kernel, Kernel] = {
    k: _twin(k, options) for k, options in (
        (segment_sumsq, _JIT_SUM), (_copy_sumsq, _JIT_SUM), (_bf16_widen_sumsq, _JIT_SUM),
        (_bf16_bits, _JIT), (adam, _JIT), (nadam, _JIT), (radam, _JIT), (adamax, _JIT),
        (adagrad, _JIT), (rmsprop, _JIT), (lamb_moments, _JIT_SUM), (scaled_sub, _JIT),
        (schedule_free, _JIT), (lerp_into, _JIT), (muon_momentum, _JIT), (decay_add, _JIT),
        (sparse_adam, _JIT))}


_SERIAL.update({k: _twin(k, options) for k, options in (
    (adafactor_row_sums, _JIT_SUM), (adafactor_col_sums, _JIT_SUM), (adafactor_factors, _JIT),
    (adafactor_update, _JIT_SUM))})


def _sized(kernel: Kernel, size: int) -> Kernel:
    """The kernel to run over ``size`` elements: the parallel one, or its serial twin."""
    return kernel if size >= SERIAL_BELOW else _SERIAL[kernel]


def _narrow(slots: dict[str, Array]) -> bool:
    """Whether the moments are kept narrow (a session's state_dtype bfloat16 or int8):
    their slots are storage objects, not arrays."""
    return any(not isinstance(v, np.ndarray) for v in slots.values())


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
        kernel = _sized(segment_sumsq, blocks.size)
        return np.asarray(kernel(x, blocks.start, blocks.end, blocks.seg, nseg))

    def run(self, algorithm: str, slots: dict[str, Array], param: Array, grad: Array,
            blocks: Blocks, coef: Array) -> None:
        if _narrow(slots):  # bfloat16 or int8 moments (engine.moments)
            from adamserve.engine import kernels_quant

            kernels_quant.run_quantized(algorithm, slots, param, grad, blocks, coef)
            return
        a, s, b = algorithm, slots, (blocks.start, blocks.end, blocks.seg)
        empty = _EMPTY[param.dtype.char]
        n = blocks.size
        if a in ("adam", "adamw"):
            _sized(adam, n)(param, grad, s["exp_avg"], s["exp_avg_sq"],
                            s.get("max_exp_avg_sq", empty), *b, coef)
        elif a == "nadam":
            _sized(nadam, n)(param, grad, s["exp_avg"], s["exp_avg_sq"], *b, coef)
        elif a == "radam":
            _sized(radam, n)(param, grad, s["exp_avg"], s["exp_avg_sq"], *b, coef)
        elif a == "adamax":
            _sized(adamax, n)(param, grad, s["exp_avg"], s["exp_inf"], *b, coef)
        elif a == "adagrad":
            _sized(adagrad, n)(param, grad, s["sum"], *b, coef)
        elif a == "rmsprop":
            _sized(rmsprop, n)(param, grad, s["square_avg"], s.get("momentum_buffer", empty),
                               s.get("grad_avg", empty), *b, coef)
        elif a in ("adamw_schedule_free", "radam_schedule_free"):
            _sized(schedule_free, n)(param, grad, s["exp_avg_sq"], s["z"], *b, coef)
        elif a == "muon":  # the momentum; the update goes over grad
            _sized(muon_momentum, n)(grad, s["momentum_buffer"], *b, coef)
        elif a == "sparse_adam":  # blocks over the touched rows only
            _sized(sparse_adam, n)(param, grad, s["exp_avg"], s["exp_avg_sq"], *b, coef)
        elif a in _OPTAX_ADAM:
            _sized(optax_adam, n)(param, grad, s["mu"], s["nu"], s.get("nu_max", empty), *b,
                                  coef)
        elif a == "optax.adamax":
            _sized(optax_adamax, n)(param, grad, s["mu"], s["nu"], *b, coef)
        elif a == "optax.lamb":  # the second pass (engine.optax_lamb): coef holds the trust
            _sized(optax_lamb, n)(param, s["mu"], s["nu"], *b, coef)
        else:
            raise ValueError(f"no CPU kernel for {a!r}")

    def lamb_moments(self, slots: dict[str, Array], param: Array, grad: Array, blocks: Blocks,
                     coef: Array) -> tuple[F64, F64]:
        if _narrow(slots):
            from adamserve.engine import kernels_quant

            sums: tuple[F64, F64] = kernels_quant.lamb_moments_quantized(
                slots, param, grad, blocks, coef)
            return sums
        nb = blocks.start.shape[0]
        psq = np.empty(nb, dtype=np.float64)
        rsq = np.empty(nb, dtype=np.float64)
        _sized(lamb_moments, blocks.size)(param, grad, slots["exp_avg"], slots["exp_avg_sq"],
                                          blocks.start, blocks.end, blocks.seg, coef, psq, rsq)
        return psq, rsq

    def scaled_sub(self, param: Array, update: Array, blocks: Blocks, scale: Array) -> None:
        _sized(scaled_sub, blocks.size)(param, update, blocks.start, blocks.end, blocks.seg,
                                        scale)

    def lerp_into(self, param: Array, end: Array, blocks: Blocks, coef: Array) -> None:
        _sized(lerp_into, blocks.size)(param, end, blocks.start, blocks.end, blocks.seg, coef)

    def adafactor_stats(self, grad: Array, row_var: Array, col_var: Array, tasks: FactorTasks,
                        coef: Array) -> Array:
        size = len(grad)
        row_sums = np.zeros(tasks.row_count, dtype=np.float64)
        partial = np.zeros((len(tasks.cols), tasks.stripe), dtype=np.float64)
        _sized(adafactor_row_sums, size)(grad, tasks.rows, coef, row_sums)
        _sized(adafactor_col_sums, size)(grad, tasks.cols, coef, partial)
        means = np.ones(tasks.batch_count, dtype=row_var.dtype)
        _sized(adafactor_factors, size)(row_var, col_var, row_sums, tasks.rows, partial,
                                        tasks.stripes, tasks.batches, coef, means)
        return means

    def adafactor_update(self, param: Array, grad: Array, variance: Array, row_var: Array,
                         col_var: Array, row_means: Array, blocks: Blocks, meta: Array,
                         coef: Array, apply: bool) -> F64 | None:
        out = np.zeros(blocks.start.shape[0], dtype=np.float64)
        _sized(adafactor_update, blocks.size)(param, grad, variance, row_var, col_var,
                                              row_means, blocks.start, blocks.end, blocks.seg,
                                              meta, coef, out, apply)
        return None if apply else out

    def decay_add(self, param: Array, update: Array, blocks: Blocks, coef: Array) -> None:
        _sized(decay_add, blocks.size)(param, update, blocks.start, blocks.end, blocks.seg, coef)

    def newton_schulz(self, x: Array, coefficients: tuple[float, float, float], steps: int,
                      eps: float) -> Array:
        return newton_schulz(x, coefficients, steps, eps)

    # -- optax (engine.optax_lamb, engine.optax_adafactor) -------------------------------

    def optax_lamb_sums(self, slots: dict[str, Array], param: Array, grad: Array,
                        blocks: Blocks, coef: Array) -> tuple[F64, F64]:
        """optax.lamb's first pass: the moments, and Σ p² and Σ u² per block."""
        nb = blocks.start.shape[0]
        psq = np.zeros(nb, dtype=np.float64)
        usq = np.zeros(nb, dtype=np.float64)
        _sized(optax_lamb_sums, blocks.size)(param, grad, slots["mu"], slots["nu"],
                                             blocks.start, blocks.end, blocks.seg, coef, psq,
                                             usq)
        return psq, usq

    def optax_adafactor_stats(self, grad: Array, v_row: Array, v_col: Array, rf: Array,
                              cf: Array, rows: Array, cols: Array, norms: Array, meta: Array,
                              coef: Array) -> None:
        """optax.adafactor's factored statistics v_row and v_col, and their factors: cf =
        v_col^-½, rf = (v_row / mean(v_row))^-½ (tasks: engine.optax_adafactor)."""
        size = len(grad)
        _sized(optax_factored_rows, size)(grad, v_row, v_col, cf, rows, meta, coef)
        _sized(optax_factored_cols, size)(grad, v_row, v_col, cf, cols, meta, coef)
        _sized(optax_factored_norm, size)(v_row, rf, norms, coef)

    def optax_adafactor_update(self, param: Array, grad: Array, v: Array, rf: Array, cf: Array,
                               ema: Array | None, blocks: Blocks, meta: Array, coef: Array,
                               mode: int) -> F64 | None:
        """optax.adafactor's update over ``blocks``: ``mode`` 0 the sums of U² per block
        (host), 1 the apply after them, 2 the apply without them."""
        out = np.zeros(blocks.start.shape[0], dtype=np.float64)
        _sized(optax_adafactor_update, blocks.size)(
            param, grad, v, rf, cf, _EMPTY[param.dtype.char] if ema is None else ema,
            blocks.start, blocks.end, blocks.seg, meta, coef, out, mode)
        return out if mode == 0 else None


_OPTAX_ADAM = frozenset({"optax.adam", "optax.adamw", "optax.amsgrad", "optax.radam"})
_EMPTY = {"f": np.zeros(0, np.float32), "d": np.zeros(0, np.float64)}


# -- optax 0.2 (engine.algorithms' optax rows) ---------------------------------------------
# Each kernel repeats optax's arithmetic operation by operation in the state dtype:
# ``(1 - b) * g + b * m`` for a moment, ``g * g`` for a square, ``jnp.maximum`` (NaN if
# either side is NaN) for a maximum. An accumulator kept in float32 in a float64 session
# (mu_dtype, dtype_momentum "float32") is stored rounded, and its ``b * m`` is a float32
# product there, as optax's weak-typed scalar times a float32 array is. They take the
# strict options (no reassociation): the passes that recompute a value must recompute it
# bit for bit.


@njit(inline="always")
def _maximum(a, b):  # type: ignore[no-untyped-def]
    return a if (a > b or a != a) else b


@njit(inline="always")
def _decayed(b, m, narrow):  # type: ignore[no-untyped-def]
    # ``b * m``, a float32 product where the accumulator m is kept in float32
    if narrow != 0:
        return np.float32(np.float32(b) * np.float32(m))
    return b * m


@njit(**_JIT)
def optax_adam(p, g, m, v, vmax, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """optax.adam / adamw / nadam(w) (kind 0), amsgrad (kind 1, ``vmax``: nu_max) and
    radam (kind 2): m̂ = m/bc1 or (nesterov) b1·m/bc1' + (1-b1)·g/bc1, v̂ = v/bc2 (or its
    running maximum), u = m̂/(sqrt(v̂ + eps_root) + eps) (radam: r·m̂/(...) where
    rectified, else m̂), u += wd·p, p += (-lr)·u."""
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, b1, omb1, b2, omb2, bc1, bc1n, bc2, eps, eps_root = (
            c[0], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11])
        nesterov, kind, rectify, r, wd, neg_lr, narrow = (
            c[12], c[13], c[14], c[15], c[16], c[17], c[18])
        lo, hi = bstart[b], bend[b]
        pb, gb, mb, vb = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        xb = vmax[lo:hi] if kind == 1 else vmax[0:0]
        for i in range(hi - lo):
            gi = gb[i] * gs
            mi = omb1 * gi + _decayed(b1, mb[i], narrow)
            vi = omb2 * (gi * gi) + b2 * vb[i]
            mb[i] = np.float32(mi) if narrow != 0 else mi
            vb[i] = vi
            mh = b1 * (mi / bc1n) + omb1 * (gi / bc1) if nesterov != 0 else mi / bc1
            vh = vi / bc2
            if kind == 1:
                vh = _maximum(xb[i], vh)
                xb[i] = vh
            if kind != 2:
                u = mh / (math.sqrt(vh + eps_root) + eps)
            elif rectify != 0:
                u = (r * mh) / (math.sqrt(vh + eps_root) + eps)
            else:
                u = mh
            pi = pb[i]
            if wd != 0:
                u = u + wd * pi
            pb[i] = pi + neg_lr * u


@njit(**_JIT)
def optax_adamax(p, g, m, u, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """optax.adamax: m = (1-b1)·g + b1·m, u = max(|g| + eps, b2·u),
    p += (-lr)·((m/bc1)/u)."""
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, b1, omb1, b2, eps, bc1, neg_lr = c[0], c[3], c[4], c[5], c[6], c[7], c[8]
        lo, hi = bstart[b], bend[b]
        pb, gb, mb, ub = p[lo:hi], g[lo:hi], m[lo:hi], u[lo:hi]
        for i in range(hi - lo):
            gi = gb[i] * gs
            mi = omb1 * gi + b1 * mb[i]
            ui = _maximum(abs(gi) + eps, b2 * ub[i])
            mb[i] = mi
            ub[i] = ui
            pb[i] = pb[i] + neg_lr * ((mi / bc1) / ui)


@njit(inline="always")
def _lamb_update(mi, vi, pi, bc1, bc2, eps, eps_root, wd):  # type: ignore[no-untyped-def]
    u = (mi / bc1) / (math.sqrt(vi / bc2 + eps_root) + eps)
    if wd != 0:
        u = u + wd * pi
    return u


@njit(**_JIT)
def optax_lamb_sums(p, g, m, v, bstart, bend, bseg, coef, psq, usq):  # type: ignore[no-untyped-def]
    """optax.lamb's first pass: the moments, and per block Σ p² and Σ u² (float64) of
    its update u = (m/bc1)/(sqrt(v/bc2 + eps_root) + eps) + wd·p; the gradient is
    only read."""
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        gs, b1, omb1, b2, omb2, bc1, bc2, eps, eps_root, wd = (
            c[0], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11])
        lo, hi = bstart[b], bend[b]
        pb, gb, mb, vb = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        pacc = 0.0
        uacc = 0.0
        for i in range(hi - lo):
            gi = gb[i] * gs
            mi = omb1 * gi + b1 * mb[i]
            vi = omb2 * (gi * gi) + b2 * vb[i]
            mb[i] = mi
            vb[i] = vi
            pi = pb[i]
            ui = _lamb_update(mi, vi, pi, bc1, bc2, eps, eps_root, wd)
            pacc += np.float64(pi) * np.float64(pi)
            uacc += np.float64(ui) * np.float64(ui)
        psq[b] = pacc
        usq[b] = uacc


@njit(**_JIT)
def optax_lamb(p, m, v, bstart, bend, bseg, coef):  # type: ignore[no-untyped-def]
    """optax.lamb's second pass: u again from the new moments, p += (-lr)·(u·trust)."""
    for b in prange(bstart.shape[0]):
        c = coef[bseg[b]]
        bc1, bc2, eps, eps_root, wd, neg_lr, trust = (
            c[7], c[8], c[9], c[10], c[11], c[12], c[13])
        lo, hi = bstart[b], bend[b]
        pb, mb, vb = p[lo:hi], m[lo:hi], v[lo:hi]
        for i in range(hi - lo):
            pi = pb[i]
            ui = _lamb_update(mb[i], vb[i], pi, bc1, bc2, eps, eps_root, wd)
            pb[i] = pi + neg_lr * (ui * trust)


# optax.adafactor (engine/optax_adafactor.py: the tasks, the meta table and the columns
# below). A factored tensor is viewed as (A, Ni, B, Nj, C), its factored axes i < j; an
# "R" statistic reduces over j ((A, Ni, B, C)), a "C" statistic over i ((A, B, Nj, C));
# v_row is the R one where the largest dim d0 is j (meta ROWR), else the C one.
# Kernel columns: gs, d, 1-d, eps, Ni, Nj, N(d1), clip denominator, lr, parameter
# scale, momentum on, momentum, 1-momentum, ema in float32, weight_decay_rate, one.
(OF_GS, OF_D, OF_OMD, OF_EPS, OF_NI, OF_NJ, OF_NROW, OF_CD, OF_LR, OF_PRMS, OF_MOM_ON, OF_MOM,
 OF_OMM, OF_NARROW, OF_WDR, OF_ONE) = range(16)
# meta columns: start, factored, A, Ni, B, Nj, C, ROWR, v_row, v_col, v offsets
(OM_START, OM_FACTORED, OM_A, OM_NI, OM_B, OM_NJ, OM_C, OM_ROWR, OM_VROW, OM_VCOL,
 OM_V) = range(11)


@njit(**_JIT)
def optax_factored_rows(g, v_row, v_col, cf, tasks, meta, coef):  # type: ignore[no-untyped-def]
    """The R statistics of rows x0 .. x0+nx of matrix a (tasks: segment, a, x0, nx):
    s = d·s + (1-d)·mean_y(g² + eps) (the sum in float64, rounded to the state dtype
    through the slot, then divided, as jnp.mean); where it is v_col, its factor
    cf = 1/sqrt(s) too."""
    for k in prange(tasks.shape[0]):
        seg, a, x0, nx = tasks[k, 0], tasks[k, 1], tasks[k, 2], tasks[k, 3]
        c = coef[seg]
        gs, d, omd, eps, nj = c[OF_GS], c[OF_D], c[OF_OMD], c[OF_EPS], c[OF_NJ]
        one = c[OF_ONE]
        mt = meta[seg]
        start, ni, bb, m, cc, rowr = (mt[OM_START], mt[OM_NI], mt[OM_B], mt[OM_NJ], mt[OM_C],
                                      mt[OM_ROWR])
        stat = v_row if rowr != 0 else v_col
        off = mt[OM_VROW] if rowr != 0 else mt[OM_VCOL]
        for x in range(x0, x0 + nx):
            row = start + (a * ni + x) * bb * m * cc
            for b in range(bb):
                for ci in range(cc):
                    e0 = row + b * m * cc + ci
                    acc = 0.0
                    for y in range(m):
                        gv = g[e0 + y * cc] * gs
                        acc += np.float64(gv * gv + eps)
                    idx = off + ((a * ni + x) * bb + b) * cc + ci
                    old = stat[idx]
                    stat[idx] = acc
                    new = d * old + omd * (stat[idx] / nj)
                    stat[idx] = new
                    if rowr == 0:
                        cf[idx] = one / math.sqrt(new)


@njit(**_JIT)
def optax_factored_cols(g, v_row, v_col, cf, tasks, meta, coef):  # type: ignore[no-untyped-def]
    """The C statistics of a stripe (tasks: segment, a, b, y0, ny; its ny·C consecutive
    elements per row, all Ni rows): as :func:`optax_factored_rows`, over x."""
    for k in prange(tasks.shape[0]):
        seg, a, b, y0, ny = tasks[k, 0], tasks[k, 1], tasks[k, 2], tasks[k, 3], tasks[k, 4]
        c = coef[seg]
        gs, d, omd, eps, ni_d = c[OF_GS], c[OF_D], c[OF_OMD], c[OF_EPS], c[OF_NI]
        one = c[OF_ONE]
        mt = meta[seg]
        start, ni, bb, m, cc, rowr = (mt[OM_START], mt[OM_NI], mt[OM_B], mt[OM_NJ], mt[OM_C],
                                      mt[OM_ROWR])
        stat = v_col if rowr != 0 else v_row
        off = mt[OM_VCOL] if rowr != 0 else mt[OM_VROW]
        width = ny * cc
        acc = np.zeros(width, dtype=np.float64)
        for x in range(ni):
            e0 = start + ((a * ni + x) * bb + b) * m * cc + y0 * cc
            for j in range(width):
                gv = g[e0 + j] * gs
                acc[j] += np.float64(gv * gv + eps)
        base = off + ((a * bb + b) * m + y0) * cc
        for j in range(width):
            idx = base + j
            old = stat[idx]
            stat[idx] = acc[j]
            new = d * old + omd * (stat[idx] / ni_d)
            stat[idx] = new
            if rowr != 0:
                cf[idx] = one / math.sqrt(new)


@njit(**_JIT)
def optax_factored_norm(v_row, rf, tasks, coef):  # type: ignore[no-untyped-def]
    """Per matrix of a factored tensor (tasks: segment, first v_row index, count, stride):
    rf = 1/sqrt(v_row / mean(v_row)) over its ``count`` entries (the mean's sum rounded
    to the state dtype through rf, then divided by N(d1))."""
    for k in prange(tasks.shape[0]):
        seg, first, count, stride = tasks[k, 0], tasks[k, 1], tasks[k, 2], tasks[k, 3]
        c = coef[seg]
        one, nrow = c[OF_ONE], c[OF_NROW]
        acc = 0.0
        for j in range(count):
            acc += np.float64(v_row[first + j * stride])
        rf[first] = acc
        mean = rf[first] / nrow
        for j in range(count):
            idx = first + j * stride
            rf[idx] = one / math.sqrt(v_row[idx] / mean)


@njit(**_JIT)
def optax_adafactor_update(  # type: ignore[no-untyped-def]
        p, g, v, rf, cf, ema, bstart, bend, bseg, meta, coef, out, mode):
    """U = g·v^-½ (v = d·v + (1-d)(g² + eps) where ``mode`` is not 1, an unfactored
    tensor) or (g·rf)·cf (factored). ``mode`` 0: Σ U² per block into ``out``; 1 or 2:
    u = ((U / clip denominator)·lr)·parameter scale, [e = (1-μ)·u + μ·e, u = e],
    u += weight_decay_rate·p, p -= u."""
    for b in prange(bstart.shape[0]):
        s = bseg[b]
        c = coef[s]
        gs, d, omd, eps, cd, lr, prms = (c[OF_GS], c[OF_D], c[OF_OMD], c[OF_EPS], c[OF_CD],
                                         c[OF_LR], c[OF_PRMS])
        mom_on, mom, omm, narrow, wdr = (c[OF_MOM_ON], c[OF_MOM], c[OF_OMM], c[OF_NARROW],
                                         c[OF_WDR])
        one = c[OF_ONE]
        mt = meta[s]
        start, factored = mt[OM_START], mt[OM_FACTORED]
        ni, bb, m, cc, rowr = mt[OM_NI], mt[OM_B], mt[OM_NJ], mt[OM_C], mt[OM_ROWR]
        lo, hi = bstart[b], bend[b]
        # where the block starts, as (a, x, b, y, c) over (A, Ni, B, Nj, C)
        e = lo - start
        ci = e % cc if factored != 0 else 0
        q = e // cc if factored != 0 else 0
        y = q % m if factored != 0 else 0
        q = q // m if factored != 0 else 0
        bi = q % bb if factored != 0 else 0
        q = q // bb if factored != 0 else 0
        x = q % ni if factored != 0 else 0
        a = q // ni if factored != 0 else 0
        voff = mt[OM_V] - start
        acc = 0.0
        for i in range(lo, hi):
            gi = g[i] * gs
            if factored != 0:
                ridx = ((a * ni + x) * bb + bi) * cc + ci
                cidx = ((a * bb + bi) * m + y) * cc + ci
                if rowr != 0:
                    ui = (gi * rf[mt[OM_VROW] + ridx]) * cf[mt[OM_VCOL] + cidx]
                else:
                    ui = (gi * rf[mt[OM_VROW] + cidx]) * cf[mt[OM_VCOL] + ridx]
                ci += 1
                if ci == cc:
                    ci = 0
                    y += 1
                    if y == m:
                        y = 0
                        bi += 1
                        if bi == bb:
                            bi = 0
                            x += 1
                            if x == ni:
                                x = 0
                                a += 1
            else:
                if mode == 1:
                    vi = v[i + voff]
                else:
                    vi = d * v[i + voff] + omd * (gi * gi + eps)
                    v[i + voff] = vi
                ui = gi * (one / math.sqrt(vi))
            if mode == 0:
                acc += np.float64(ui) * np.float64(ui)
                continue
            u = ((ui / cd) * lr) * prms
            if mom_on != 0:
                u = omm * u + _decayed(mom, ema[i], narrow)
                ema[i] = np.float32(u) if narrow != 0 else u
            pi = p[i]
            if wdr != 0:
                u = u + wdr * pi
            p[i] = pi - u
        out[b] = acc


_SERIAL.update({k: _twin(k, _JIT) for k in (
    optax_adam, optax_adamax, optax_lamb_sums, optax_lamb, optax_factored_rows,
    optax_factored_cols, optax_factored_norm, optax_adafactor_update)})
