"""Fused CPU kernels (numba) over 8-bit and bfloat16 moments (engine/quantize.py).

One pass over memory per step: each moment is dequantised, updated with exactly the
float32 kernel's arithmetic (kernels_cpu: the same operations in the same order, so a
step equals "dequantise, run the float32 kernel, quantise" bit for bit) and written
back quantised. The walk is the float32 kernels' block table; within a block
(cut at a tensor's first element in multiples of BLOCK, so it holds whole QBLOCKs of
one tensor) the int8 kernels go QBLOCK by QBLOCK through a scratch of a QBLOCK:

1. the codes' map values times the block's scale into the scratch (a table lookup per
   element);
2. the update over the scratch (vectorised: the algorithm, and the new max |x| as the
   largest float32 bit pattern with the sign cleared, which also keeps a NaN);
3. each moment requantised with its new scale s: a bucket per element from float32
   ``|x|·(stretch/s)`` (vectorised), then ``code = t + (mid[t]·s < x)`` in float64 with
   ``t = table[bucket]`` (quantize.code_table). As ``mid[t]·s`` is exact in float64 and
   no x/s lies within half a float64 ulp of a midpoint it does not equal, that is
   ``mid[t] < float64(x)/float64(s)``: the reference's comparison, without the
   division. A scale that is 0, not finite or below 2**-125 takes the definition
   itself (a division per element).

Tensors under MIN_QUANTIZED run the float32 update on the slot's ``small`` part. The
bfloat16 kernels widen, update and round stochastically per element
(:func:`adamserve.engine.quantize.stochastic_bits`, whose key per call and slot comes
from the host). Each algorithm is one element function (``_adam`` ...) shared by both
drivers, which are compiled once per algorithm from one source (``_int8_driver``,
``_bf16_driver``) with that function as a global; below SERIAL_BELOW elements their
serial twins run, as in kernels_cpu.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from llvmlite import ir  # type: ignore[import-untyped]  # numba's own dependency
from numba import njit, prange
from numba.core import types as nbtypes
from numba.extending import intrinsic

from adamserve.engine import quantize as q
from adamserve.engine.backend import F64, Array, Blocks, block_table
from adamserve.engine.kernels_cpu import (
    _JIT,
    _JIT_SUM,
    BLOCK,
    SERIAL_BELOW,
    _bits_f32,
    _f32_bits,
    _lerp,
    _twin,
)
from adamserve.engine.quantize import Bf16Moments, Int8Moments

QB = q.QBLOCK
_TS = q.TABLE_SIZE
_BASE32 = q.TABLE_BASE32
_SHIFT32 = q.TABLE_SHIFT32
_BASE64 = q.TABLE_BASE
_SHIFT64 = q.TABLE_SHIFT
_STRETCH = q.TABLE_STRETCH
# The fast requantisation needs 1/s finite in float32 and its error relative: s >= this
_SAFE_MIN = np.float32(2.0**-125)
_F32_MAX = np.float32(np.finfo(np.float32).max)
_M32 = 0xFFFFFFFF
# numba's default error model checks every float division for a zero divisor (and would
# raise): a branch out of each loop that keeps LLVM from vectorising it. numpy's gives
# IEEE results, as the parallel kernels of kernels_cpu get.
_OPTS = {**_JIT, "error_model": "numpy"}
_OPTS_SUM = {**_JIT_SUM, "error_model": "numpy"}


@intrinsic
def _abs_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """A float32's bits with the sign cleared, as a uint32: ordered as |x|, a NaN above
    every number (numba would widen ``bits & mask`` to 64 bits, halving the lanes)."""
    if x != nbtypes.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        return builder.and_(builder.bitcast(args[0], i32), i32(0x7FFFFFFF))

    return nbtypes.uint32(nbtypes.float32), codegen


@intrinsic
def _bucket(typingctx, a, x):  # type: ignore[no-untyped-def]
    """The search table's index of x, from ``a`` = |x|·stretch/scale (float32): the
    bucket of a's exponent and top mantissa bits, clipped to the table, in the negative
    half for a set sign bit; as a uint16, in 32-bit arithmetic."""
    if a != nbtypes.float32 or x != nbtypes.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        b = builder.sub(builder.lshr(builder.bitcast(args[0], i32), i32(_SHIFT32)),
                        i32(_BASE32))
        b = builder.select(builder.icmp_signed("<", b, i32(0)), i32(0), b)
        b = builder.select(builder.icmp_signed(">", b, i32(_TS - 1)), i32(_TS - 1), b)
        sign = builder.lshr(builder.bitcast(args[1], i32), i32(31))
        b = builder.add(b, builder.mul(sign, i32(_TS)))
        return builder.trunc(b, ir.IntType(16))

    return nbtypes.uint16(nbtypes.float32, nbtypes.float32), codegen


@intrinsic
def _f64_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """A float64's bits as an int64 (a bitcast)."""
    if x != nbtypes.float64:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(sig.return_type))

    return nbtypes.int64(nbtypes.float64), codegen


# -- element updates: (coefficients, p, g, m, v, x) -> (p, g, m, v, x) ---------------------
# Each repeats its kernels_cpu kernel's arithmetic operation by operation; x is the
# third moment (AMSGrad's max_exp_avg_sq), passed through by the others. The coefficient
# tuples are unpacked once per block by the ``*_prep`` functions.


@njit(inline="always")
def _adam_prep(c):  # type: ignore[no-untyped-def]
    w = c[3]
    return (c[0], c[1], c[2], w, c[4], c[5], -c[6], c[7], c[8], c[9], c[c.shape[0] - 1] - w)


@njit(inline="always")
def _adam_third(k):  # type: ignore[no-untyped-def]
    return k[9] != 0


@njit(inline="always")
def _adam(k, pi, gr, mi, vi, xi):  # type: ignore[no-untyped-def]
    gs, wd, decay, w, b2, omb2, neg, bc2s, eps, ams, omw = k
    gi = gr * gs + wd * pi
    pi = pi * decay
    mi = _lerp(mi, gi, w, omw)
    vi = vi * b2 + omb2 * gi * gi
    if ams != 0:
        xi = max(xi, vi)
        d = xi
    else:
        d = vi
    return pi + neg * mi / (math.sqrt(d) / bc2s + eps), gr, mi, vi, xi


@njit(inline="always")
def _no_third(k):  # type: ignore[no-untyped-def]
    return False


@njit(inline="always")
def _nadam_prep(c):  # type: ignore[no-untyped-def]
    w = c[3]
    return (c[0], c[1], c[2], w, c[4], c[5], c[6], c[7], c[8], c[9], c[c.shape[0] - 1] - w)


@njit(inline="always")
def _nadam(k, pi, gr, mi, vi, xi):  # type: ignore[no-untyped-def]
    gs, wd, decay, w, b2, omb2, bc2, eps, cg, cm, omw = k
    gi = gr * gs + wd * pi
    pi = pi * decay
    mi = _lerp(mi, gi, w, omw)
    vi = vi * b2 + omb2 * gi * gi
    d = math.sqrt(vi / bc2) + eps
    pi = pi + cg * gi / d
    return pi + cm * mi / d, gr, mi, vi, xi


@njit(inline="always")
def _radam_prep(c):  # type: ignore[no-untyped-def]
    w = c[3]
    return (c[0], c[1], c[2], w, c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11],
            c[c.shape[0] - 1] - w)


@njit(inline="always")
def _radam(k, pi, gr, mi, vi, xi):  # type: ignore[no-untyped-def]
    gs, wd, decay, w, b2, omb2, bc1, lr, rectify, rect, bc2s, eps, omw = k
    gi = gr * gs + wd * pi
    pi = pi * decay
    mi = _lerp(mi, gi, w, omw)
    vi = vi * b2 + omb2 * gi * gi
    if rectify != 0:
        pn = pi - (mi / bc1) * lr * (bc2s / (math.sqrt(vi) + eps)) * rect
    else:
        pn = pi - (mi / bc1) * lr
    return pn, gr, mi, vi, xi


@njit(inline="always")
def _adamax_prep(c):  # type: ignore[no-untyped-def]
    w = c[3]
    return (c[0], c[1], w, c[4], c[5], -c[6], c[c.shape[0] - 1] - w)


@njit(inline="always")
def _adamax(k, pi, gr, mi, ui, xi):  # type: ignore[no-untyped-def]
    gs, wd, w, b2, eps, neg, omw = k
    gi = gr * gs + wd * pi
    mi = _lerp(mi, gi, w, omw)
    ui = max(ui * b2, abs(gi) + eps)
    return pi + neg * mi / ui, gr, mi, ui, xi


@njit(inline="always")
def _lamb_prep(c):  # type: ignore[no-untyped-def]
    return (c[0], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10])


@njit(inline="always")
def _lamb(k, pi, gr, mi, vi, xi):  # type: ignore[no-untyped-def]
    gs, b1, omb1, b2, omb2, bc1, bc2, eps, wd = k
    gi = gr * gs
    mi = omb1 * gi + b1 * mi
    vi = omb2 * gi * gi + b2 * vi
    ri = (mi / bc1) / (math.sqrt(vi / bc2) + eps) + wd * pi
    return pi, ri, mi, vi, xi


# -- int8: requantisation ---------------------------------------------------------------


@njit(inline="always")
def _code64(y, tab, mid):  # type: ignore[no-untyped-def]
    """The reference's code of a float64 y: searchsorted(mid, y) (a NaN: the last)."""
    if y != y:
        return 255
    b = (_f64_bits(abs(y) * _STRETCH) >> _SHIFT64) - _BASE64
    b = min(max(b, 0), _TS - 1)
    t = np.int64(tab[b + _TS if y < 0 else b])
    return t + (1 if mid[t] < y else 0)


@njit(inline="always")
def _requant(xs, n, codes, scales, qb, amax, tab, mid, bk):  # type: ignore[no-untyped-def]
    """Write the QBLOCK ``xs[:n]`` as ``codes[:n]`` with scale ``bits(amax)``. Every index
    is unsigned or counts from 0: numba's check for a negative index costs three
    instructions a lookup."""
    s = _bits_f32(amax)
    scales[qb] = s
    if s == 0:
        zc = tab[0]
        for j in range(n):
            codes[j] = zc
    elif s >= _SAFE_MIN and s <= _F32_MAX:
        s64 = np.float64(s)
        inv = np.float32(_STRETCH / s64)
        for j in range(n):
            x = xs[j]
            bk[j] = _bucket(abs(x) * inv, x)
        for j in range(n):
            t = tab[bk[j]]
            codes[j] = t + (mid[t] * s64 < np.float64(xs[j]))
    else:  # NaN, Inf or a tiny scale: the definition
        s64 = np.float64(s)
        for j in range(n):
            codes[j] = _code64(np.float64(xs[j]) / s64, tab, mid)


# What the drivers call, bound per algorithm by _specialise (never called unbound).
_EL: Any = None  # the element update
_PREP: Any = None  # the coefficient row's unpacking
_THIRD: Any = None  # whether a segment updates a third moment
_LAMB = False  # LAMB's first pass: r over g, the sums of squares, p kept


def _int8_driver(p, g, bstart, bend, bseg, coef, meta,  # type: ignore[no-untyped-def]
                 c0, s0, f0, map0, tab0, mid0, c1, s1, f1, map1, tab1, mid1,
                 c2, s2, f2, map2, tab2, mid2, psq, rsq):
    """Moments 0 and 1 (and 2 where ``_THIRD``) as int8 slots (codes, scale, small,
    map, table, midpoints); LAMB (``_LAMB``) writes r over g and the sums of squares."""
    zero = np.float32(0.0)
    for b in prange(bstart.shape[0]):
        seg = bseg[b]
        k = _PREP(coef[seg])
        third = _THIRD(k)
        lo, hi = bstart[b], bend[b]
        first = meta[seg, 2]
        at = meta[seg, 1]
        pacc = 0.0
        racc = 0.0
        if at >= 0:  # a small tensor: float32 moments
            sh = at - first
            for i in range(lo, hi):
                pi = p[i]
                xi = f2[i + sh] if third else zero
                pn, gn, mi, vi, xi = _EL(k, pi, g[i], f0[i + sh], f1[i + sh], xi)
                f0[i + sh] = mi
                f1[i + sh] = vi
                if third:
                    f2[i + sh] = xi
                if _LAMB:
                    g[i] = gn
                    pacc += np.float64(pi) * np.float64(pi)
                    racc += np.float64(gn) * np.float64(gn)
                else:
                    p[i] = pn
        else:
            xs0 = np.empty(QB, np.float32)
            xs1 = np.empty(QB, np.float32)
            xs2 = np.empty(QB, np.float32)
            bk = np.empty(QB, np.uint16)
            qb = meta[seg, 0] + (lo - first) // QB
            for a in range(lo, hi, QB):
                n = min(QB, hi - a)
                cb0, cb1 = c0[a:a + n], c1[a:a + n]
                # the scales applied here, not in the update: LAMB's fast-math flags
                # would let LLVM reassociate a product across the two
                sc0 = s0[qb]
                sc1 = s1[qb]
                for j in range(n):
                    xs0[j] = map0[cb0[j]] * sc0
                    xs1[j] = map1[cb1[j]] * sc1
                am0 = np.uint32(0)
                am1 = np.uint32(0)
                am2 = np.uint32(0)
                pb = p[a:a + n]
                gb = g[a:a + n]
                if third:
                    cb2 = c2[a:a + n]
                    sc2 = s2[qb]
                    for j in range(n):
                        xs2[j] = map2[cb2[j]] * sc2
                    for j in range(n):
                        pi = pb[j]
                        pn, gn, mi, vi, xi = _EL(k, pi, gb[j], xs0[j], xs1[j], xs2[j])
                        xs0[j] = mi
                        xs1[j] = vi
                        xs2[j] = xi
                        am0 = max(am0, _abs_bits(mi))
                        am1 = max(am1, _abs_bits(vi))
                        am2 = max(am2, _abs_bits(xi))
                        pb[j] = pn
                    _requant(xs2, n, cb2, s2, qb, am2, tab2, mid2, bk)
                else:
                    for j in range(n):
                        pi = pb[j]
                        pn, gn, mi, vi, xi = _EL(k, pi, gb[j], xs0[j], xs1[j], zero)
                        xs0[j] = mi
                        xs1[j] = vi
                        am0 = max(am0, _abs_bits(mi))
                        am1 = max(am1, _abs_bits(vi))
                        if _LAMB:
                            gb[j] = gn
                            pacc += np.float64(pi) * np.float64(pi)
                            racc += np.float64(gn) * np.float64(gn)
                        else:
                            pb[j] = pn
                _requant(xs0, n, cb0, s0, qb, am0, tab0, mid0, bk)
                _requant(xs1, n, cb1, s1, qb, am1, tab1, mid1, bk)
                qb += 1
        if _LAMB:
            psq[b] = pacc
            rsq[b] = racc


# -- bfloat16: stochastic rounding --------------------------------------------------------


@njit(inline="always")
def _mix32(x):  # type: ignore[no-untyped-def]
    m = np.uint64(_M32)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & m
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


@njit(inline="always")
def _sround(x, key, i):  # type: ignore[no-untyped-def]
    """float32 ``x`` to bfloat16 bits, stochastically (quantize.stochastic_round_ref with
    quantize.stochastic_bits of element ``i`` under ``key``)."""
    ii = np.uint64(i)
    m = np.uint64(_M32)
    h = _mix32((ii & m) ^ key ^ (((ii >> np.uint64(32)) * np.uint64(q.HIGH_MIX)) & m))
    u = np.uint64(_f32_bits(x))
    r = (u + (h >> np.uint64(16))) >> np.uint64(16)
    if (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000):
        r = (u >> np.uint64(16)) | np.uint64(0x40)  # a NaN stays a NaN (quiet), never Inf
    return np.uint16(r)


@njit(inline="always")
def _widen(bits):  # type: ignore[no-untyped-def]
    return _bits_f32(np.uint32(bits) << np.uint32(16))


def _bf16_driver(p, g, bstart, bend, bseg, coef, b0, k0, b1, k1, b2, k2,  # type: ignore[no-untyped-def]
                 psq, rsq):
    """Moments 0 and 1 (and 2 where ``_THIRD``) as bfloat16 bits with their call keys."""
    zero = np.float32(0.0)
    for b in prange(bstart.shape[0]):
        k = _PREP(coef[bseg[b]])
        lo, hi = bstart[b], bend[b]
        # slices indexed from 0 (an index numba cannot prove >= 0 keeps LLVM from vectorising)
        pb, gb, m_, v_ = p[lo:hi], g[lo:hi], b0[lo:hi], b1[lo:hi]
        pacc = 0.0
        racc = 0.0
        if _THIRD(k):
            x_ = b2[lo:hi]
            for j in range(hi - lo):
                pn, gn, mi, vi, xi = _EL(k, pb[j], gb[j], _widen(m_[j]), _widen(v_[j]),
                                         _widen(x_[j]))
                m_[j] = _sround(mi, k0, lo + j)
                v_[j] = _sround(vi, k1, lo + j)
                x_[j] = _sround(xi, k2, lo + j)
                pb[j] = pn
        else:
            for j in range(hi - lo):
                pi = pb[j]
                pn, gn, mi, vi, xi = _EL(k, pi, gb[j], _widen(m_[j]), _widen(v_[j]), zero)
                m_[j] = _sround(mi, k0, lo + j)
                v_[j] = _sround(vi, k1, lo + j)
                if _LAMB:
                    gb[j] = gn
                    pacc += np.float64(pi) * np.float64(pi)
                    racc += np.float64(gn) * np.float64(gn)
                else:
                    pb[j] = pn
        if _LAMB:
            psq[b] = pacc
            rsq[b] = racc


# -- compiling the drivers per algorithm ------------------------------------------------

Kernel = Callable[..., Any]

# per algorithm: its element update, coefficient unpacking and third moment (slots and
# columns: quantize.STEP_SLOTS)
_ALGORITHMS: dict[str, tuple[Any, Any, Any]] = {
    "adam": (_adam, _adam_prep, _adam_third),
    "nadam": (_nadam, _nadam_prep, _no_third),
    "radam": (_radam, _radam_prep, _no_third),
    "adamax": (_adamax, _adamax_prep, _no_third),
    "lamb": (_lamb, _lamb_prep, _no_third),
}


def _specialise(driver: Any, algorithm: str, kind: str) -> tuple[Kernel, Kernel]:
    """The parallel kernel and its serial twin of ``driver`` for ``algorithm``: the same
    code with the element function and flags bound as globals (so that numba inlines
    them and caches each under its own name)."""
    el, prep, third = _ALGORITHMS[algorithm]
    name = f"{algorithm}_{kind}"
    scope = dict(driver.__globals__, _EL=el, _PREP=prep, _THIRD=third,
                 _LAMB=algorithm == "lamb")
    fn = types.FunctionType(driver.__code__, scope, name)
    fn.__qualname__ = name
    options = _OPTS_SUM if algorithm == "lamb" else _OPTS  # the flags of kernels_cpu's
    kernel = njit(**options)(fn)
    return kernel, _twin(kernel, options)


_KERNELS: dict[tuple[str, str], tuple[Kernel, Kernel]] = {
    (a, kind): _specialise(driver, a, kind)
    for a in _ALGORITHMS for kind, driver in (("int8", _int8_driver), ("bfloat16", _bf16_driver))}


def kernel(algorithm: str, kind: str, size: int) -> Kernel:
    """The compiled kernel of ``algorithm`` over ``kind`` moments for ``size`` elements
    (the serial twin below SERIAL_BELOW)."""
    parallel, serial = _KERNELS[(q.STEP_ALIASES.get(algorithm, algorithm), kind)]
    return parallel if size >= SERIAL_BELOW else serial


# -- dispatch ---------------------------------------------------------------------------

_TABLES: dict[bool, tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], F64]] = {
    s: (q.qmap(s), *q.code_table(s)) for s in (True, False)}
_E32 = np.zeros(0, np.float32)
_E8 = np.zeros(0, np.uint8)
_E16 = np.zeros(0, np.uint16)
_NONE = np.zeros(0, np.float64)


def _check_arrays(param: Array, grad: Array, coef: Array, columns: int) -> None:
    for name, a in (("param", param), ("grad", grad)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 1 or (
                not a.flags.c_contiguous):
            raise ValueError(f"{name}: quantised moments step float32 parameters (a flat "
                             f"contiguous float32 buffer), got {getattr(a, 'dtype', type(a))}")
    if grad.shape != param.shape:
        raise ValueError(f"grad: expected {param.shape[0]} elements (as param), got "
                         f"{grad.shape[0]}")
    if not isinstance(coef, np.ndarray) or coef.dtype != np.float32 or coef.ndim != 2 or (
            coef.shape[1] <= columns):
        raise ValueError(f"coefficient matrix: expected float32 [segments, > {columns}], got "
                         f"{getattr(coef, 'dtype', type(coef))} {getattr(coef, 'shape', '')}")


def _check_int8(moments: list[Any], blocks: Blocks, size: int) -> None:
    """The slots share one layout, which the block table fits (quantize.misaligned)."""
    meta = moments[0].meta
    for m in moments:
        if m is None:
            continue
        if not isinstance(m.codes, np.ndarray):
            raise ValueError("int8 moments on the CPU must hold NumPy arrays")
        if m.meta is not meta and not np.array_equal(m.meta, meta):
            raise ValueError("int8 moments of one step must share their layout (meta)")
    why = q.misaligned(np.asarray(blocks.start), np.asarray(blocks.end), blocks.host_seg, meta,
                       size)
    if why is not None:
        raise ValueError(why)


def _launch(algorithm: str, slots: dict[str, Any], param: Array, grad: Array, blocks: Blocks,
            coef: Array, psq: F64, rsq: F64) -> None:
    _check_arrays(param, grad, coef, q.STEP_SLOTS.get(
        q.STEP_ALIASES.get(algorithm, algorithm), ((), 0))[1])
    size = int(param.shape[0])
    a, kind, got = q.step_slots(algorithm, slots, size)
    third = got[2] if len(got) > 2 else None
    if a == "adam" and third is None and (coef[:, 9] != 0).any():
        raise ValueError("adam: amsgrad is on for some tensors but there is no max_exp_avg_sq")
    b = (blocks.start, blocks.end, blocks.seg, coef)
    fn = kernel(a, kind, blocks.size)
    if kind == "int8":
        int8 = cast(list[Int8Moments | None], got)
        _check_int8(int8, blocks, size)
        args: list[Any] = []
        for s in (*int8[:2], int8[2] if len(int8) > 2 else None):
            if s is None:
                args += [_E8, _E32, _E32, *_TABLES[False]]
            else:
                args += [s.codes, s.scale, s.small, *_TABLES[s.signed]]
        fn(param, grad, *b, cast(Int8Moments, int8[0]).meta, *args, psq, rsq)
        return
    bf16 = cast(list[Bf16Moments | None], got)
    keys: list[Any] = []
    for h in (*bf16[:2], bf16[2] if len(bf16) > 2 else None):
        if h is None:
            keys += [_E16, np.uint64(0)]
        else:
            if not isinstance(h.bits, np.ndarray) or h.bits.dtype != np.uint16:
                raise ValueError("bfloat16 moments on the CPU must hold NumPy uint16 bits")
            keys += [h.bits, np.uint64(q.stream_key(h.seed, h.counter))]
    fn(param, grad, *b, *keys, psq, rsq)
    for h in bf16:
        if h is not None:
            h.counter += 1


def run_quantized(algorithm: str, slots: dict[str, Any], param: Array, grad: Array,
                  blocks: Blocks, coef: Array) -> None:
    """One fused step of ``algorithm`` (adam, adamw, nadam, radam, adamax) over
    quantised moments (all Int8Moments or all Bf16Moments, keyed by torch's slot names;
    max_exp_avg_sq where amsgrad is on), as CpuBackend.run does over float32 ones.
    Bfloat16 slots' counters advance by one."""
    if q.STEP_ALIASES.get(algorithm, algorithm) == "lamb":
        raise ValueError("lamb steps through lamb_moments_quantized")
    _launch(algorithm, slots, param, grad, blocks, coef, _NONE, _NONE)


def lamb_moments_quantized(slots: dict[str, Any], param: Array, grad: Array, blocks: Blocks,
                           coef: Array) -> tuple[F64, F64]:
    """LAMB's first pass over quantised moments: the new moments, r written over
    ``grad``, and per block the sums of squares of p and r (float64), as
    CpuBackend.lamb_moments."""
    nb = int(blocks.start.shape[0])
    psq = np.empty(nb, dtype=np.float64)
    rsq = np.empty(nb, dtype=np.float64)
    _launch("lamb", slots, param, grad, blocks, coef, psq, rsq)
    return psq, rsq


# -- host conversions (engine/quantize.py's fast path) -------------------------------------


@njit(**_OPTS)
def _quantize(values, codes, scale, small, meta, bstart, bend, bseg, tab, mid):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        seg = bseg[b]
        lo, hi = bstart[b], bend[b]
        first = meta[seg, 2]
        at = meta[seg, 1]
        if at >= 0:
            for i in range(lo, hi):
                small[at + i - first] = values[i]
            continue
        xs = np.empty(QB, np.float32)
        bk = np.empty(QB, np.uint16)
        qb = meta[seg, 0] + (lo - first) // QB
        for a in range(lo, hi, QB):
            n = min(QB, hi - a)
            am = np.uint32(0)
            vb = values[a:a + n]
            for j in range(n):
                x = vb[j]
                xs[j] = x
                am = max(am, _abs_bits(x))
            _requant(xs, n, codes[a:a + n], scale, qb, am, tab, mid, bk)
            qb += 1


@njit(**_OPTS)
def _dequantize(out, codes, scale, small, meta, bstart, bend, bseg, qmap):  # type: ignore[no-untyped-def]
    for b in prange(bstart.shape[0]):
        seg = bseg[b]
        lo, hi = bstart[b], bend[b]
        first = meta[seg, 2]
        at = meta[seg, 1]
        if at >= 0:
            for i in range(lo, hi):
                out[i] = small[at + i - first]
            continue
        qb = meta[seg, 0] + (lo - first) // QB
        for a in range(lo, hi, QB):
            s = scale[qb]
            for i in range(a, min(a + QB, hi)):
                out[i] = qmap[codes[i]] * s
            qb += 1


_SERIAL_HOST = {k: _twin(k, _OPTS) for k in (_quantize, _dequantize)}


def _host_blocks(meta: npt.NDArray[np.int64], size: int) -> tuple[Any, Any, Any]:
    offsets = np.append(meta[:, 2], size).astype(np.int64)
    return block_table(offsets, BLOCK)


def quantize_into(slot: Int8Moments, values: npt.NDArray[np.float32]) -> None:
    """``slot`` (host NumPy, laid out) := ``values`` quantised, as quantize_tensor_ref."""
    size = slot.size
    fn = _quantize if size >= SERIAL_BELOW else _SERIAL_HOST[_quantize]
    tab, mid = _TABLES[slot.signed][1:]
    fn(values, slot.codes, slot.scale, slot.small, slot.meta, *_host_blocks(slot.meta, size),
       tab, mid)


def dequantize_host(slot: Int8Moments) -> npt.NDArray[np.float32]:
    """The float32 values of a host ``slot``, as dequantize_tensor_ref."""
    size = slot.size
    out = np.empty(size, dtype=np.float32)
    fn = _dequantize if size >= SERIAL_BELOW else _SERIAL_HOST[_dequantize]
    fn(out, slot.codes, slot.scale, slot.small, slot.meta, *_host_blocks(slot.meta, size),
       q.qmap(slot.signed))
    return out
