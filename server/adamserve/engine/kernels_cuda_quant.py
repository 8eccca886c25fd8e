"""Fused CUDA kernels (CuPy) over 8-bit and bfloat16 moments: the GPU twin of
:mod:`adamserve.engine.kernels_quant`, with the same formats (engine/quantize.py).

Each entry of the block table (at most kernels_cuda.BLOCK = 16 QBLOCKs of one tensor,
cut at its first element) is one CUDA block of THREADS threads. For int8 moments each
warp takes one QBLOCK at a time: a lane dequantises, updates and keeps 8 of its
elements (lane + 32·r, so that a warp's reads are consecutive), the warp reduces the new
max |x| with shuffles (as the largest float32 bit pattern with the sign cleared, which
keeps a NaN), lane 0 writes the scale and every lane its codes, found by the
definition: ``y = (double)x / (double)s``, a table on the top bits of 1.17·|y| and one
comparison with the midpoint (quantize.code_table). Tensors under MIN_QUANTIZED update
their float32 ``small`` part. The bfloat16 kernels widen, update and round each element
stochastically with quantize.stochastic_bits's hash (32-bit arithmetic, the call's key
from the host).

The element updates repeat kernels_cuda's float32 ones operation by operation
(``lerp`` two-sided, Python's max, no fused multiply-adds: kernels_cuda's NVRTC options),
so a step equals "dequantise, run the float32 kernel, quantise". CuPy is reached through
kernels_cuda (the one module that imports it), and importing this module without it
raises ImportError.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine import kernels_cuda
from adamserve.engine import quantize as q
from adamserve.engine.backend import Array, Blocks

cupy = kernels_cuda.cupy  # type: ignore[attr-defined]  # only kernels_cuda imports it
F64 = npt.NDArray[np.float64]
THREADS = kernels_cuda.THREADS
assert kernels_cuda.BLOCK % q.QBLOCK == 0 and THREADS % 32 == 0

# the kernels' functor per algorithm (quantize.STEP_SLOTS gives their slots and columns)
OPS = {"adam": "AdamOp", "nadam": "NadamOp", "radam": "RadamOp", "adamax": "AdamaxOp",
       "lamb": "LambOp"}

# Element code: plain C++ but for the bit casts, so that a test can build it for the host.
_ELEMENT_SOURCE = r"""
#define THREADS @THREADS@
#define QBLOCK @QBLOCK@
#define TS @TS@
#define BASE64 @BASE64@LL
#define SHIFT64 @SHIFT64@
#define STRETCH @STRETCH@
#define HIGH_MIX @HIGH_MIX@u

// torch's lerp, the two-sided form by the weight's side of 0.5 (kernels_cuda's lerp_t)
__device__ __forceinline__ float q_lerp(float a, float b, float w) {
    if (w < 0.5f) {
        return a + w * (b - a);
    }
    return b - (b - a) * (1.0f - w);
}

// Python's max(a, b): b when b > a, else a (so a NaN in b yields a)
__device__ __forceinline__ float q_max(float a, float b) { return (b > a) ? b : a; }

// the algorithms without a third moment
struct NoThird {
    __device__ bool third() const { return false; }
};

struct AdamOp {
    static constexpr bool lamb = false;
    float gs, wd, decay, w, b2, omb2, neg, bc2s, eps;
    bool ams;
    __device__ explicit AdamOp(const float* c)
        : gs(c[0]), wd(c[1]), decay(c[2]), w(c[3]), b2(c[4]), omb2(c[5]), neg(-c[6]),
          bc2s(c[7]), eps(c[8]), ams(c[9] != 0.0f) {}
    __device__ bool third() const { return ams; }
    __device__ void operator()(float& p, float& g, float& m, float& v, float& x,
                               bool use3) const {
        const float gi = g * gs + wd * p;
        const float pi = p * decay;
        m = q_lerp(m, gi, w);
        v = v * b2 + omb2 * gi * gi;
        float d = v;
        if (use3) {  // amsgrad, with max_exp_avg_sq there
            x = q_max(x, v);
            d = x;
        }
        p = pi + neg * m / (sqrtf(d) / bc2s + eps);
    }
};

struct NadamOp : NoThird {
    static constexpr bool lamb = false;
    float gs, wd, decay, w, b2, omb2, bc2, eps, cg, cm;
    __device__ explicit NadamOp(const float* c)
        : gs(c[0]), wd(c[1]), decay(c[2]), w(c[3]), b2(c[4]), omb2(c[5]), bc2(c[6]),
          eps(c[7]), cg(c[8]), cm(c[9]) {}
    __device__ void operator()(float& p, float& g, float& m, float& v, float& x,
                               bool use3) const {
        const float gi = g * gs + wd * p;
        float pi = p * decay;
        m = q_lerp(m, gi, w);
        v = v * b2 + omb2 * gi * gi;
        const float d = sqrtf(v / bc2) + eps;
        pi = pi + cg * gi / d;
        p = pi + cm * m / d;
    }
};

struct RadamOp : NoThird {
    static constexpr bool lamb = false;
    float gs, wd, decay, w, b2, omb2, bc1, lr, rect, bc2s, eps;
    bool rectified;
    __device__ explicit RadamOp(const float* c)
        : gs(c[0]), wd(c[1]), decay(c[2]), w(c[3]), b2(c[4]), omb2(c[5]), bc1(c[6]),
          lr(c[7]), rect(c[9]), bc2s(c[10]), eps(c[11]), rectified(c[8] != 0.0f) {}
    __device__ void operator()(float& p, float& g, float& m, float& v, float& x,
                               bool use3) const {
        const float gi = g * gs + wd * p;
        const float pi = p * decay;
        m = q_lerp(m, gi, w);
        v = v * b2 + omb2 * gi * gi;
        if (rectified) {
            p = pi - (m / bc1) * lr * (bc2s / (sqrtf(v) + eps)) * rect;
        } else {
            p = pi - (m / bc1) * lr;
        }
    }
};

struct AdamaxOp : NoThird {
    static constexpr bool lamb = false;
    float gs, wd, w, b2, eps, neg;
    __device__ explicit AdamaxOp(const float* c)
        : gs(c[0]), wd(c[1]), w(c[3]), b2(c[4]), eps(c[5]), neg(-c[6]) {}
    __device__ void operator()(float& p, float& g, float& m, float& u, float& x,
                               bool use3) const {
        const float gi = g * gs + wd * p;
        m = q_lerp(m, gi, w);
        u = q_max(u * b2, fabsf(gi) + eps);
        p = p + neg * m / u;
    }
};

// LAMB's first pass: p stays, g becomes the update r
struct LambOp : NoThird {
    static constexpr bool lamb = true;
    float gs, b1, omb1, b2, omb2, bc1, bc2, eps, wd;
    __device__ explicit LambOp(const float* c)
        : gs(c[0]), b1(c[3]), omb1(c[4]), b2(c[5]), omb2(c[6]), bc1(c[7]), bc2(c[8]),
          eps(c[9]), wd(c[10]) {}
    __device__ void operator()(float& p, float& g, float& m, float& v, float& x,
                               bool use3) const {
        const float gi = g * gs;
        m = omb1 * gi + b1 * m;
        v = omb2 * gi * gi + b2 * v;
        g = (m / bc1) / (sqrtf(v / bc2) + eps) + wd * p;
    }
};

// quantize.quantize_ref's code of x in a block of scale s
__device__ __forceinline__ unsigned char q8_code(float x, float s, const unsigned char* tab,
                                                 const double* mid) {
    const double y = (s == 0.0f) ? 0.0 : (double)x / (double)s;
    if (y != y) {
        return 255;
    }
    long long b = (__double_as_longlong(fabs(y) * STRETCH) >> SHIFT64) - BASE64;
    b = b < 0 ? 0 : (b > TS - 1 ? TS - 1 : b);
    const int t = tab[b + (y < 0.0 ? TS : 0)];
    return (unsigned char)(t + (mid[t] < y ? 1 : 0));
}

__device__ __forceinline__ unsigned q_mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// quantize.stochastic_round_ref with quantize.stochastic_bits of element i under key
__device__ __forceinline__ unsigned short q_sround(float x, unsigned key, long long i) {
    const unsigned long long ii = (unsigned long long)i;
    const unsigned h = q_mix32((unsigned)ii ^ key ^ ((unsigned)(ii >> 32) * HIGH_MIX));
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x40u);  // a NaN stays a NaN (quiet), never Inf
    }
    return (unsigned short)((u + (h >> 16)) >> 16);
}

__device__ __forceinline__ float q_widen(unsigned short b) {
    return __uint_as_float(((unsigned)b) << 16);
}

"""

# The kernels (CUDA only): reductions, and the drivers of the element code above.
_KERNEL_SOURCE = r"""
// Sum over the block's threads of two doubles; every thread must call it.
__device__ __forceinline__ void q_block_sum2(double& x, double& y) {
    __shared__ double sx[THREADS];
    __shared__ double sy[THREADS];
    const unsigned t = threadIdx.x;
    sx[t] = x;
    sy[t] = y;
    __syncthreads();
    for (unsigned s = THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            sx[t] += sx[t + s];
            sy[t] += sy[t + s];
        }
        __syncthreads();
    }
    x = sx[0];
    y = sy[0];
}

__device__ __forceinline__ unsigned q_warp_max(unsigned v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

#define Q8_SLOT(k) unsigned char* __restrict__ c##k, float* __restrict__ s##k, \
    float* __restrict__ f##k, const float* __restrict__ map##k, \
    const unsigned char* __restrict__ tab##k, const double* __restrict__ mid##k

template <class Op>
__global__ void __launch_bounds__(THREADS) adamserve_q8(
        float* __restrict__ p, float* __restrict__ g,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const float* __restrict__ coef, const long long ldc,
        const long long* __restrict__ meta, Q8_SLOT(0), Q8_SLOT(1), Q8_SLOT(2),
        const int has2, double* __restrict__ psq, double* __restrict__ rsq) {
    const long long b = (long long)blockIdx.x;
    const long long seg = bseg[b];
    const Op op(coef + seg * ldc);
    const bool third = (has2 != 0) && op.third();
    const long long lo = bstart[b], hi = bend[b];
    const long long first = meta[3 * seg + 2], at = meta[3 * seg + 1];
    double pacc = 0.0;
    double racc = 0.0;
    if (at >= 0) {  // a small tensor: float32 moments
        const long long sh = at - first;
        for (long long i = lo + (long long)threadIdx.x; i < hi; i += THREADS) {
            float pi = p[i], gi = g[i], mi = f0[i + sh], vi = f1[i + sh];
            float xi = third ? f2[i + sh] : 0.0f;
            const float p0 = pi;
            op(pi, gi, mi, vi, xi, third);
            f0[i + sh] = mi;
            f1[i + sh] = vi;
            if (third) {
                f2[i + sh] = xi;
            }
            if (Op::lamb) {
                g[i] = gi;
                pacc += (double)p0 * (double)p0;
                racc += (double)gi * (double)gi;
            } else {
                p[i] = pi;
            }
        }
    } else {
        const int lane = threadIdx.x & 31;
        const long long nq = (hi - lo + QBLOCK - 1) / QBLOCK;
        const long long qb0 = meta[3 * seg] + (lo - first) / QBLOCK;
        for (long long k = threadIdx.x >> 5; k < nq; k += THREADS / 32) {  // warp-uniform
            const long long a = lo + k * QBLOCK, qb = qb0 + k;
            const int n = (int)min((long long)QBLOCK, hi - a);
            const float sc0 = s0[qb], sc1 = s1[qb], sc2 = third ? s2[qb] : 0.0f;
            float m[QBLOCK / 32], v[QBLOCK / 32], x[QBLOCK / 32];
            unsigned am0 = 0u, am1 = 0u, am2 = 0u;
#pragma unroll
            for (int r = 0; r < QBLOCK / 32; ++r) {
                const int j = lane + 32 * r;
                m[r] = v[r] = x[r] = 0.0f;
                if (j < n) {
                    const long long i = a + j;
                    float pi = p[i], gi = g[i];
                    float mi = map0[c0[i]] * sc0, vi = map1[c1[i]] * sc1;
                    float xi = third ? map2[c2[i]] * sc2 : 0.0f;
                    const float p0 = pi;
                    op(pi, gi, mi, vi, xi, third);
                    if (Op::lamb) {
                        g[i] = gi;
                        pacc += (double)p0 * (double)p0;
                        racc += (double)gi * (double)gi;
                    } else {
                        p[i] = pi;
                    }
                    m[r] = mi;
                    v[r] = vi;
                    x[r] = xi;
                    am0 = max(am0, __float_as_uint(mi) & 0x7fffffffu);
                    am1 = max(am1, __float_as_uint(vi) & 0x7fffffffu);
                    am2 = max(am2, __float_as_uint(xi) & 0x7fffffffu);
                }
            }
            const float n0 = __uint_as_float(q_warp_max(am0));
            const float n1 = __uint_as_float(q_warp_max(am1));
            const float n2 = __uint_as_float(q_warp_max(am2));
            if (lane == 0) {
                s0[qb] = n0;
                s1[qb] = n1;
                if (third) {
                    s2[qb] = n2;
                }
            }
#pragma unroll
            for (int r = 0; r < QBLOCK / 32; ++r) {
                const int j = lane + 32 * r;
                if (j < n) {
                    const long long i = a + j;
                    c0[i] = q8_code(m[r], n0, tab0, mid0);
                    c1[i] = q8_code(v[r], n1, tab1, mid1);
                    if (third) {
                        c2[i] = q8_code(x[r], n2, tab2, mid2);
                    }
                }
            }
        }
    }
    if (Op::lamb) {
        q_block_sum2(pacc, racc);
        if (threadIdx.x == 0) {
            psq[b] = pacc;
            rsq[b] = racc;
        }
    }
}

template <class Op>
__global__ void __launch_bounds__(THREADS) adamserve_qbf16(
        float* __restrict__ p, float* __restrict__ g,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const float* __restrict__ coef, const long long ldc,
        unsigned short* __restrict__ b0, const unsigned k0,
        unsigned short* __restrict__ b1, const unsigned k1,
        unsigned short* __restrict__ b2, const unsigned k2, const int has2,
        double* __restrict__ psq, double* __restrict__ rsq) {
    const long long b = (long long)blockIdx.x;
    const Op op(coef + bseg[b] * ldc);
    const bool third = (has2 != 0) && op.third();
    const long long hi = bend[b];
    double pacc = 0.0;
    double racc = 0.0;
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        float pi = p[i], gi = g[i], mi = q_widen(b0[i]), vi = q_widen(b1[i]);
        float xi = third ? q_widen(b2[i]) : 0.0f;
        const float p0 = pi;
        op(pi, gi, mi, vi, xi, third);
        b0[i] = q_sround(mi, k0, i);
        b1[i] = q_sround(vi, k1, i);
        if (third) {
            b2[i] = q_sround(xi, k2, i);
        }
        if (Op::lamb) {
            g[i] = gi;
            pacc += (double)p0 * (double)p0;
            racc += (double)gi * (double)gi;
        } else {
            p[i] = pi;
        }
    }
    if (Op::lamb) {
        q_block_sum2(pacc, racc);
        if (threadIdx.x == 0) {
            psq[b] = pacc;
            rsq[b] = racc;
        }
    }
}
"""
_CONSTANTS = {"THREADS": THREADS, "QBLOCK": q.QBLOCK, "TS": q.TABLE_SIZE, "BASE64": q.TABLE_BASE,
              "SHIFT64": q.TABLE_SHIFT, "STRETCH": repr(q.TABLE_STRETCH), "HIGH_MIX": q.HIGH_MIX}
for _key, _value in _CONSTANTS.items():
    _ELEMENT_SOURCE = _ELEMENT_SOURCE.replace(f"@{_key}@", str(_value))
_SOURCE = _ELEMENT_SOURCE + _KERNEL_SOURCE

KERNELS = tuple(f"adamserve_{kind}<{op}>" for op in OPS.values() for kind in ("q8", "qbf16"))

_lock = threading.Lock()
_module: Any = None
_device: dict[tuple[str, int], Any] = {}  # compiled kernels and tables, per device
_checked: weakref.WeakValueDictionary[int, Blocks] = weakref.WeakValueDictionary()


def _get(key: str) -> Any:
    """A compiled kernel (``adamserve_q8<AdamOp>``) or a search table ("int8 True"),
    for the current device, made on first use."""
    global _module
    dev = int(cupy.cuda.runtime.getDevice())
    found = _device.get((key, dev))
    if found is None:
        with _lock:
            found = _device.get((key, dev))
            if found is None:
                if key.startswith("adamserve_"):
                    if _module is None:
                        _module = cupy.RawModule(code=_SOURCE, options=kernels_cuda._OPTIONS,
                                                 name_expressions=list(KERNELS))
                    found = _module.get_function(key)
                else:
                    signed = key.endswith("True")
                    found = (cupy.asarray(q.qmap(signed)),
                             *(cupy.asarray(t) for t in q.code_table(signed)))
                _device[(key, dev)] = found
    return found


def compile_all() -> None:
    """Compile and load every kernel now (otherwise done on first use)."""
    for k in KERNELS:
        _get(k)


def _coef(coef: Array, columns: int) -> Array:
    c = cupy.ascontiguousarray(cupy.asarray(coef, dtype=np.float32))
    if c.ndim != 2 or c.shape[1] < columns:
        raise ValueError(f"coefficient matrix: expected [segments, >= {columns}], got {c.shape}")
    return c


def _check(param: Array, grad: Array) -> int:
    for name, a in (("param", param), ("grad", grad)):
        if a.dtype != np.float32 or a.ndim != 1:
            raise ValueError(f"{name}: quantised moments step float32 parameters (a flat "
                             f"float32 buffer), got {a.dtype} of {a.ndim} dims")
    if grad.shape != param.shape:
        raise ValueError(f"grad: expected {param.shape[0]} elements (as param), got "
                         f"{grad.shape[0]}")
    return int(param.shape[0])


def _check_layout(moments: list[Any], blocks: Blocks, size: int) -> None:
    """quantize.misaligned, once per block table (the host copies cost a sync)."""
    if _checked.get(id(blocks)) is blocks:
        return
    meta = cupy.asnumpy(moments[0].meta)
    for m in moments[1:]:
        if m is not None and m.meta is not moments[0].meta and not np.array_equal(
                cupy.asnumpy(m.meta), meta):
            raise ValueError("int8 moments of one step must share their layout (meta)")
    why = q.misaligned(cupy.asnumpy(blocks.start), cupy.asnumpy(blocks.end), blocks.host_seg,
                       meta, size)
    if why is not None:
        raise ValueError(why)
    _checked[id(blocks)] = blocks


def _launch(algorithm: str, slots: dict[str, Any], param: Array, grad: Array, blocks: Blocks,
            coef: Array, sums: tuple[Array, Array] | None) -> None:
    size = _check(param, grad)
    a, kind, moments = q.step_slots(algorithm, slots, size)
    got: list[Any] = list(moments)  # all Int8Moments or all Bf16Moments (or None)
    c = _coef(coef, q.STEP_SLOTS[a][1] + 1)
    third = got[2] if len(got) > 2 else None
    nb = int(blocks.start.shape[0])
    if nb == 0:
        return
    psq, rsq = sums if sums is not None else (_absent(np.float64), _absent(np.float64))
    head = (param, grad, blocks.start, blocks.end, blocks.seg, c, np.int64(c.shape[1]))
    tail = (np.int32(third is not None), psq, rsq)
    grid, threads = (nb,), (THREADS,)
    if kind == "int8":
        _check_layout(got, blocks, size)
        args: list[Any] = []
        for m in (*got[:2], third):
            if m is None:
                args += [_absent(np.uint8), _absent(np.float32), _absent(np.float32),
                         *_get("int8 False")]
            else:
                args += [m.codes, m.scale, m.small, *_get(f"int8 {m.signed}")]
        _get(f"adamserve_q8<{OPS[a]}>")(grid, threads, (*head, got[0].meta, *args, *tail))
        return
    keys: list[Any] = []
    for m in (*got[:2], third):
        if m is None:
            keys += [_absent(np.uint16), np.uint32(0)]
        else:
            keys += [m.bits, np.uint32(q.stream_key(m.seed, m.counter))]
    _get(f"adamserve_qbf16<{OPS[a]}>")(grid, threads, (*head, *keys, *tail))
    for m in got:
        if m is not None:
            m.counter += 1


def _absent(dtype: Any) -> Array:
    """A one-element buffer for a slot that is not there (never touched)."""
    key = f"absent {np.dtype(dtype).char}"
    found = _device.get((key, int(cupy.cuda.runtime.getDevice())))
    if found is None:
        found = cupy.zeros(1, dtype=dtype)
        _device[(key, int(cupy.cuda.runtime.getDevice()))] = found
    return found


def run_quantized(algorithm: str, slots: dict[str, Any], param: Array, grad: Array,
                  blocks: Blocks, coef: Array) -> None:
    """kernels_quant.run_quantized on CuPy arrays (the moments' fields CuPy arrays too)."""
    if q.STEP_ALIASES.get(algorithm, algorithm) == "lamb":
        raise ValueError("lamb steps through lamb_moments_quantized")
    _launch(algorithm, slots, param, grad, blocks, coef, None)


def lamb_moments_quantized(slots: dict[str, Any], param: Array, grad: Array, blocks: Blocks,
                           coef: Array) -> tuple[F64, F64]:
    """kernels_quant.lamb_moments_quantized on CuPy arrays: the sums come to the host."""
    nb = int(blocks.start.shape[0])
    psq = cupy.zeros(max(nb, 1), dtype=np.float64)
    rsq = cupy.zeros(max(nb, 1), dtype=np.float64)
    _launch("lamb", slots, param, grad, blocks, coef, (psq, rsq))
    return (np.asarray(cupy.asnumpy(psq[:nb]), dtype=np.float64),
            np.asarray(cupy.asnumpy(rsq[:nb]), dtype=np.float64))
