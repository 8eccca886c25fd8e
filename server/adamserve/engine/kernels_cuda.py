"""Fused CUDA kernels (CuPy) over one flat buffer per state slot.

The GPU twin of :mod:`adamserve.engine.kernels_cpu`, and the only module of the
project that imports CuPy. Each entry of the block table (a chunk of at most
:data:`BLOCK` elements that never crosses a tensor boundary) is one CUDA block of
:data:`THREADS` threads; each thread strides over its entry, so a warp reads and
writes consecutive elements. The entry's coefficient row is read into registers
once, then every element is read and written exactly once.

The arithmetic repeats the CPU kernels operation by operation, in the state dtype
``T`` (``float`` or ``double``): the same evaluation order, ``lerp`` with torch's
two-sided formula, correctly rounded ``/`` and ``sqrt``, and no contraction of
``a*b + c`` into fused multiply-adds (``--fmad=false``), so float64 agrees with the
CPU backend and torch to rounding. Reductions (sums of squares) accumulate in
double: one partial sum per table entry from a shared-memory tree, added up per
tensor on the host.

The CUDA source is compiled by NVRTC once per process (and device), lazily on
first use, for both dtypes; every per-step value travels as a kernel argument or
in the coefficient matrix, so nothing is recompiled between steps.

Importing this module without a usable CuPy raises :class:`ImportError` and
nothing else, which :func:`adamserve.engine.backend.select_backend` relies on.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine.adafactor import STRIPE
from adamserve.engine.backend import Array, Blocks, FactorTasks
from adamserve.engine.muon import newton_schulz

try:
    import cupy
except Exception as exc:  # CuPy wraps most failures in ImportError; make sure of it
    if isinstance(exc, ImportError):
        raise
    raise ImportError(f"cupy failed to import: {exc!r}") from exc

F64 = npt.NDArray[np.float64]

BLOCK = 4096  # elements per block-table entry, i.e. per CUDA block
THREADS = 256  # threads per CUDA block (a power of two: the reductions assume it)

_CTYPES = {"f": "float", "d": "double"}

# Coefficient columns each kernel reads (the widest index + 1), see algorithms.py.
_COLUMNS = {"adam": 10, "adamw": 10, "nadam": 10, "radam": 12, "adamax": 7, "adagrad": 5,
            "rmsprop": 9, "lamb": 11, "adamw_schedule_free": 13, "radam_schedule_free": 13}
_COLUMNS["muon"] = 8  # the momentum kernel
_COLUMNS["sparse_adam"] = 7  # over the blocks of the touched rows

_SOURCE = r"""
#define THREADS @THREADS@

__device__ __forceinline__ float root(float x) { return sqrtf(x); }
__device__ __forceinline__ double root(double x) { return sqrt(x); }
__device__ __forceinline__ float absval(float x) { return fabsf(x); }
__device__ __forceinline__ double absval(double x) { return fabs(x); }

// torch's lerp: the form used depends on which side of 0.5 the weight is.
template <typename T>
__device__ __forceinline__ T lerp_t(T a, T b, T w) {
    if (w < T(0.5)) {
        return a + w * (b - a);
    }
    return b - (b - a) * (T(1) - w);
}

// Python's max(a, b): b when b > a, else a (so a NaN in b yields a).
template <typename T>
__device__ __forceinline__ T pymax(T a, T b) {
    return (b > a) ? b : a;
}

// Sum over the block's threads of two doubles; every thread must call it.
__device__ __forceinline__ void block_sum2(double& x, double& y) {
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

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_sumsq(
        const T* __restrict__ x,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        double* __restrict__ partial) {
    const long long b = (long long)blockIdx.x;
    const long long hi = bend[b];
    double acc = 0.0;
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const double xi = (double)x[i];
        acc += xi * xi;
    }
    double unused = 0.0;
    block_sum2(acc, unused);
    if (threadIdx.x == 0) {
        partial[b] = acc;
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adam(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
        T* __restrict__ vmax, const int has_vmax,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], wd = c[1], decay = c[2], w = c[3], b2 = c[4], omb2 = c[5];
    const T step_size = c[6], bc2s = c[7], eps = c[8], ams = c[9];
    const T neg = -step_size;
    const bool use_max = (has_vmax != 0) && (ams != T(0));
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        T pi = p[i];
        const T gi = g[i] * gs + wd * pi;
        pi = pi * decay;
        const T mi = lerp_t(m[i], gi, w);
        T vi = v[i] * b2 + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        if (use_max) {
            vi = pymax(vmax[i], vi);
            vmax[i] = vi;
        }
        p[i] = pi + neg * mi / (root(vi) / bc2s + eps);
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_nadam(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], wd = c[1], decay = c[2], w = c[3], b2 = c[4], omb2 = c[5];
    const T bc2 = c[6], eps = c[7], cg = c[8], cm = c[9];
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        T pi = p[i];
        const T gi = g[i] * gs + wd * pi;
        pi = pi * decay;
        const T mi = lerp_t(m[i], gi, w);
        const T vi = v[i] * b2 + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const T d = root(vi / bc2) + eps;
        pi = pi + cg * gi / d;
        p[i] = pi + cm * mi / d;
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_radam(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], wd = c[1], decay = c[2], w = c[3], b2 = c[4], omb2 = c[5];
    const T bc1 = c[6], lr = c[7], rectify = c[8], rect = c[9], bc2s = c[10], eps = c[11];
    const bool rectified = rectify != T(0);
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        T pi = p[i];
        const T gi = g[i] * gs + wd * pi;
        pi = pi * decay;
        const T mi = lerp_t(m[i], gi, w);
        const T vi = v[i] * b2 + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        if (rectified) {
            p[i] = pi - (mi / bc1) * lr * (bc2s / (root(vi) + eps)) * rect;
        } else {
            p[i] = pi - (mi / bc1) * lr;
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adamax(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ u,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], wd = c[1], w = c[3], b2 = c[4], eps = c[5], clr = c[6];
    const T neg = -clr;
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T pi = p[i];
        const T gi = g[i] * gs + wd * pi;
        const T mi = lerp_t(m[i], gi, w);
        const T ui = pymax(u[i] * b2, absval(gi) + eps);
        m[i] = mi;
        u[i] = ui;
        p[i] = pi + neg * mi / ui;
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adagrad(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], wd = c[1], clr = c[3], eps = c[4];
    const T neg = -clr;
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T pi = p[i];
        const T gi = g[i] * gs + wd * pi;
        const T si = s[i] + gi * gi;
        s[i] = si;
        p[i] = pi + neg * gi / (root(si) + eps);
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_rmsprop(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ sq,
        T* __restrict__ buf, const int has_buf, T* __restrict__ gavg, const int has_gavg,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], wd = c[1], alpha = c[3], oma = c[4], centered = c[5], eps = c[6];
    const T mom = c[7], lr = c[8];
    const T neg = -lr;
    const bool use_centered = (has_gavg != 0) && (centered != T(0));
    const bool use_momentum = (has_buf != 0) && (mom > T(0));
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T pi = p[i];
        const T gi = g[i] * gs + wd * pi;
        const T si = sq[i] * alpha + oma * gi * gi;
        sq[i] = si;
        T avg;
        if (use_centered) {
            const T ga = lerp_t(gavg[i], gi, oma);
            gavg[i] = ga;
            avg = root(si + (-ga) * ga) + eps;
        } else {
            avg = root(si) + eps;
        }
        if (use_momentum) {
            const T bi = buf[i] * mom + gi / avg;
            buf[i] = bi;
            p[i] = pi + neg * bi;
        } else {
            p[i] = pi + neg * gi / avg;
        }
    }
}

// First LAMB pass: moments, the update r written over the gradient, and per-entry
// sums of squares of p and r (double) at sums[b] and sums[nblocks + b].
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_lamb_moments(
        const T* __restrict__ p, T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc,
        double* __restrict__ sums, const long long nblocks) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], b1 = c[3], omb1 = c[4], b2 = c[5], omb2 = c[6];
    const T bc1 = c[7], bc2 = c[8], eps = c[9], wd = c[10];
    double pacc = 0.0;
    double racc = 0.0;
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T pi = p[i];
        const T gi = g[i] * gs;
        const T mi = omb1 * gi + b1 * m[i];
        const T vi = omb2 * gi * gi + b2 * v[i];
        m[i] = mi;
        v[i] = vi;
        const T ri = (mi / bc1) / (root(vi / bc2) + eps) + wd * pi;
        g[i] = ri;
        pacc += (double)pi * (double)pi;
        racc += (double)ri * (double)ri;
    }
    block_sum2(pacc, racc);
    if (threadIdx.x == 0) {
        sums[b] = pacc;
        sums[nblocks + b] = racc;
    }
}

// Schedule-free AdamW and RAdam (schedulefree's step; p holds y), one pass. adapt off
// (RAdam before rho_t > 4) leaves the gradient unnormalised; init (a tensor's first
// step) starts z as y and the second moment at 0.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_schedule_free(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ v, T* __restrict__ z,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], b2 = c[3], omb2 = c[4], bc2 = c[5], eps = c[6], adapt = c[7];
    const T wd = c[8], ckp1 = c[9], cy = c[10], lr = c[11], init = c[12];
    const bool first = init != T(0);
    const bool adaptive = adapt != T(0);
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        T yi = p[i];
        T gi = g[i] * gs;
        const T zi = first ? yi : z[i];
        const T vi = (first ? T(0) : v[i]) * b2 + omb2 * gi * gi;
        v[i] = vi;
        if (adaptive) {
            gi = gi / (root(vi / bc2) + eps);
        }
        if (wd != T(0)) {
            gi = gi + wd * yi;
        }
        yi = lerp_t(yi, zi, ckp1);
        p[i] = yi + cy * gi;
        z[i] = zi - lr * gi;
    }
}

// p = torch.lerp(p, e, w), w = coef[segment * ldc]: the schedule-free train()/eval()
// swap. Its weights may be negative, so the form is chosen on |w| as torch does.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_lerp_into(
        T* __restrict__ p, const T* __restrict__ e,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T w = coef[bseg[b] * ldc];
    const T omw = T(1) - w;
    const bool small = absval(w) < T(0.5);
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T a = p[i];
        const T d = e[i] - a;
        p[i] = small ? a + w * d : e[i] - d * omw;
    }
}

// Muon's momentum (torch's buf.lerp_(g, 1-mu)), and over g the update the Newton-Schulz
// iteration then orthogonalises: g.lerp(buf, mu) (nesterov) or buf.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_muon_momentum(
        T* __restrict__ g, T* __restrict__ buf,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], w = c[3], mu = c[4];
    const bool nesterov = c[5] != T(0);
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T gi = g[i] * gs;
        const T bi = lerp_t(buf[i], gi, w);
        buf[i] = bi;
        g[i] = nesterov ? lerp_t(gi, bi, mu) : bi;
    }
}

// p = p * decay + scale * u, (decay, scale) = coef[segment]: torch's p.mul_(1 - lr wd)
// then p.add_(u, alpha=scale) (Muon's apply).
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_decay_add(
        T* __restrict__ p, const T* __restrict__ u,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T decay = coef[bseg[b] * ldc], scale = coef[bseg[b] * ldc + 1];
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        p[i] = p[i] * decay + scale * u[i];
    }
}

// p -= scale[segment] * r: LAMB's second pass.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_scaled_sub(
        T* __restrict__ p, const T* __restrict__ r,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ scale) {
    const long long b = (long long)blockIdx.x;
    const T neg = -scale[bseg[b]];
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        p[i] = p[i] + neg * r[i];
    }
}
""".replace("@THREADS@", str(THREADS))

_KERNELS: tuple[str, ...] = ("sumsq", "adam", "nadam", "radam", "adamax", "adagrad", "rmsprop",
            "lamb_moments", "scaled_sub", "schedule_free", "lerp_into", "muon_momentum",
            "decay_add")

# Adafactor (engine/adafactor.py: the passes, the tables and the coefficient columns
# gs, decay, w, eps1, eps1², cols, rows, scale, one). Rows are summed one warp per row,
# column stripes one thread per column (ADAFACTOR_STRIPE wide, THREADS / that many rows
# at once), both in double; the update walks its block as the other kernels do.
_SOURCE += r"""
#define ADAFACTOR_STRIPE @STRIPE@

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adafactor_row_sums(
        const T* __restrict__ g, const long long* __restrict__ tasks,
        const T* __restrict__ coef, const long long ldc, double* __restrict__ out) {
    const long long* t = tasks + 5 * (long long)blockIdx.x;
    const long long lo = t[1], nrows = t[2], r0 = t[3], m = t[4];
    const T gs = coef[t[0] * ldc];
    const unsigned lane = threadIdx.x & 31u;
    for (long long r = (long long)(threadIdx.x >> 5); r < nrows; r += THREADS / 32) {
        const T* row = g + lo + r * m;
        double acc = 0.0;
        for (long long j = (long long)lane; j < m; j += 32) {
            const double x = (double)(row[j] * gs);
            acc += x * x;
        }
        for (int off = 16; off > 0; off >>= 1) {
            acc += __shfl_down_sync(0xffffffffu, acc, off);
        }
        if (lane == 0) {
            out[r0 + r] = acc;
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adafactor_col_sums(
        const T* __restrict__ g, const long long* __restrict__ tasks,
        const T* __restrict__ coef, const long long ldc, double* __restrict__ partial) {
    __shared__ double sums[THREADS];
    const long long* t = tasks + 5 * (long long)blockIdx.x;
    const long long lo = t[1], nrows = t[2], width = t[3], m = t[4];
    const T gs = coef[t[0] * ldc];
    const long long col = (long long)(threadIdx.x % ADAFACTOR_STRIPE);
    const long long lane = (long long)(threadIdx.x / ADAFACTOR_STRIPE);
    double acc = 0.0;
    if (col < width) {
        for (long long r = lane; r < nrows; r += THREADS / ADAFACTOR_STRIPE) {
            const double x = (double)(g[lo + r * m + col] * gs);
            acc += x * x;
        }
    }
    sums[threadIdx.x] = acc;
    __syncthreads();
    if (lane == 0 && col < width) {
        double total = 0.0;
        for (unsigned l = 0; l < THREADS / ADAFACTOR_STRIPE; ++l) {
            total += sums[l * ADAFACTOR_STRIPE + col];
        }
        partial[(long long)blockIdx.x * ADAFACTOR_STRIPE + col] = total;
    }
}

// torch's row_var.lerp_(norm(g, dim=-1).square_().div_(m), w): the norm rounded to T
// before it is squared. One block per rows task.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adafactor_row_factors(
        T* __restrict__ row_var, const double* __restrict__ row_sums,
        const long long* __restrict__ tasks, const T* __restrict__ coef, const long long ldc) {
    const long long* t = tasks + 5 * (long long)blockIdx.x;
    const T* c = coef + t[0] * ldc;
    const T w = c[2], m = c[5];
    const long long r0 = t[3], hi = t[3] + t[2];
    for (long long r = r0 + (long long)threadIdx.x; r < hi; r += THREADS) {
        const T norm = (T)sqrt(row_sums[r]);
        row_var[r] = lerp_t(row_var[r], norm * norm / m, w);
    }
}

// col_var alike, from the stripes' partial sums (in task order). One block per stripe.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adafactor_col_factors(
        T* __restrict__ col_var, const double* __restrict__ partial,
        const long long* __restrict__ stripes, const T* __restrict__ coef,
        const long long ldc) {
    const long long* s = stripes + 5 * (long long)blockIdx.x;
    const T* c = coef + s[0] * ldc;
    const T w = c[2], n = c[6];
    const long long t0 = s[1], nt = s[2], c0 = s[3], width = s[4];
    for (long long j = (long long)threadIdx.x; j < width; j += THREADS) {
        double total = 0.0;
        for (long long k = t0; k < t0 + nt; ++k) {
            total += partial[k * ADAFACTOR_STRIPE + j];
        }
        const T norm = (T)sqrt(total);
        col_var[c0 + j] = lerp_t(col_var[c0 + j], norm * norm / n, w);
    }
}

// Per matrix: max(mean(row_var), eps1) (the sum rounded to T, then divided by the rows,
// as torch's mean). One block per matrix.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adafactor_means(
        const T* __restrict__ row_var, const long long* __restrict__ batches,
        const T* __restrict__ coef, const long long ldc, T* __restrict__ means) {
    const long long* bt = batches + 4 * (long long)blockIdx.x;
    const T* c = coef + bt[0] * ldc;
    const long long first = bt[1], hi = bt[1] + bt[2];
    double acc = 0.0;
    for (long long r = first + (long long)threadIdx.x; r < hi; r += THREADS) {
        acc += (double)row_var[r];
    }
    double unused = 0.0;
    block_sum2(acc, unused);
    if (threadIdx.x == 0) {
        const T mean = (T)acc / c[6];
        means[bt[3]] = (mean < c[3]) ? c[3] : mean;
    }
}

// U = g gs rsqrt(max(v, eps1^2)): the sum of U^2 per block (lerping variance, the second
// moment of the tensors of fewer than 2 dims), or with apply p = p decay + scale U.
// meta (per tensor): start, factored, cols, rows, row_var, col_var, matrix and variance
// offsets.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_adafactor_update(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ var,
        const T* __restrict__ row_var, const T* __restrict__ col_var,
        const T* __restrict__ means,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const long long* __restrict__ meta,
        const T* __restrict__ coef, const long long ldc, double* __restrict__ out,
        const int apply) {
    const long long b = (long long)blockIdx.x;
    const long long* mt = meta + 8 * bseg[b];
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], decay = c[1], w = c[2], e2 = c[4], scale = c[7];
    const long long lo = bstart[b], hi = bend[b], start = mt[0];
    const bool factored = mt[1] != 0;
    const long long m = mt[2], n = mt[3];
    const long long row0 = factored ? (lo - start) / m : 0;
    const long long col0 = (lo - start) - row0 * m;
    double acc = 0.0;
    for (long long i = lo + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T gi = g[i] * gs;
        T vi;
        if (factored) {
            const long long local = col0 + (i - lo);
            const long long dr = local / m;
            const long long row = row0 + dr;
            const long long mat = row / n;
            vi = row_var[mt[4] + row] * col_var[mt[5] + mat * m + (local - dr * m)]
                 / means[mt[6] + mat];
        } else if (apply) {
            vi = var[mt[7] + (i - start)];
        } else {
            vi = lerp_t(var[mt[7] + (i - start)], gi * gi, w);
            var[mt[7] + (i - start)] = vi;
        }
        const T u = T(1) / root((vi < e2) ? e2 : vi) * gi;
        if (apply) {
            p[i] = p[i] * decay + scale * u;
        } else {
            acc += (double)u * (double)u;
        }
    }
    if (!apply) {
        double unused = 0.0;
        block_sum2(acc, unused);
        if (threadIdx.x == 0) {
            out[b] = acc;
        }
    }
}
""".replace("@STRIPE@", str(STRIPE))
_KERNELS += ("adafactor_row_sums", "adafactor_col_sums", "adafactor_row_factors",
             "adafactor_col_factors", "adafactor_means", "adafactor_update")

# SparseAdam (engine/sparse_adam.py): its block table covers the touched rows only, so
# this is an elementwise kernel like the others, in torch's order of operations.
_SOURCE += r"""
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_sparse_adam(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], omb1 = c[3], omb2 = c[4], eps = c[5], neg = c[6];
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T gi = g[i] * gs;
        T mi = m[i];
        T vi = v[i];
        mi = mi + (gi - mi) * omb1;
        vi = vi + (gi * gi - vi) * omb2;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] + neg * (mi / (root(vi) + eps));
    }
}
"""
_KERNELS += ("sparse_adam",)

# optax 0.2 (engine.algorithms' optax rows): the CPU's optax kernels (kernels_cpu), in
# the same order of operations; Adafactor's factored tensors as (A, Ni, B, Nj, C), its
# kernel columns OF_* and meta columns OM_* as kernels_cpu numbers them.
_SOURCE += r"""
// jnp.maximum: NaN where either side is NaN.
template <typename T>
__device__ __forceinline__ T nanmax(T a, T b) {
    return (a > b || a != a) ? a : b;
}

// b * m, a float32 product where the accumulator m is kept in float32.
template <typename T>
__device__ __forceinline__ T decayed(T b, T m, bool narrow) {
    return narrow ? (T)((float)b * (float)m) : b * m;
}

// optax.adam / adamw / nadam(w) (kind 0), amsgrad (kind 1, vmax: nu_max), radam (kind 2).
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_adam(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
        T* __restrict__ vmax, const int has_vmax,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], b1 = c[3], omb1 = c[4], b2 = c[5], omb2 = c[6], bc1 = c[7];
    const T bc1n = c[8], bc2 = c[9], eps = c[10], eps_root = c[11];
    const bool nesterov = c[12] != T(0), rectified = c[14] != T(0), narrow = c[18] != T(0);
    const int kind = (int)c[13];
    const T r = c[15], wd = c[16], neg_lr = c[17];
    const bool use_max = kind == 1 && has_vmax != 0;
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T gi = g[i] * gs;
        const T mi = omb1 * gi + decayed(b1, m[i], narrow);
        const T vi = omb2 * (gi * gi) + b2 * v[i];
        m[i] = narrow ? (T)(float)mi : mi;
        v[i] = vi;
        const T mh = nesterov ? b1 * (mi / bc1n) + omb1 * (gi / bc1) : mi / bc1;
        T vh = vi / bc2;
        if (use_max) {
            vh = nanmax(vmax[i], vh);
            vmax[i] = vh;
        }
        T u;
        if (kind != 2) {
            u = mh / (root(vh + eps_root) + eps);
        } else if (rectified) {
            u = (r * mh) / (root(vh + eps_root) + eps);
        } else {
            u = mh;
        }
        const T pi = p[i];
        if (wd != T(0)) {
            u = u + wd * pi;
        }
        p[i] = pi + neg_lr * u;
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_adamax(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ u,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], b1 = c[3], omb1 = c[4], b2 = c[5], eps = c[6], bc1 = c[7];
    const T neg_lr = c[8];
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T gi = g[i] * gs;
        const T mi = omb1 * gi + b1 * m[i];
        const T ui = nanmax(absval(gi) + eps, b2 * u[i]);
        m[i] = mi;
        u[i] = ui;
        p[i] = p[i] + neg_lr * ((mi / bc1) / ui);
    }
}

template <typename T>
__device__ __forceinline__ T lamb_update(T mi, T vi, T pi, const T* c) {
    T u = (mi / c[7]) / (root(vi / c[8] + c[10]) + c[9]);
    if (c[11] != T(0)) {
        u = u + c[11] * pi;
    }
    return u;
}

// optax.lamb's first pass: the moments, and per entry sums of p^2 and u^2 (double) at
// sums[b] and sums[nblocks + b]; the gradient is only read.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_lamb_sums(
        const T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
        T* __restrict__ v,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc,
        double* __restrict__ sums, const long long nblocks) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], b1 = c[3], omb1 = c[4], b2 = c[5], omb2 = c[6];
    double pacc = 0.0;
    double uacc = 0.0;
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T gi = g[i] * gs;
        const T mi = omb1 * gi + b1 * m[i];
        const T vi = omb2 * (gi * gi) + b2 * v[i];
        m[i] = mi;
        v[i] = vi;
        const T pi = p[i];
        const T ui = lamb_update(mi, vi, pi, c);
        pacc += (double)pi * (double)pi;
        uacc += (double)ui * (double)ui;
    }
    block_sum2(pacc, uacc);
    if (threadIdx.x == 0) {
        sums[b] = pacc;
        sums[nblocks + b] = uacc;
    }
}

// optax.lamb's second pass: u again from the new moments, p += (-lr) (u trust).
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_lamb(
        T* __restrict__ p, const T* __restrict__ m, const T* __restrict__ v,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const T* __restrict__ coef, const long long ldc) {
    const long long b = (long long)blockIdx.x;
    const T* c = coef + bseg[b] * ldc;
    const T neg_lr = c[12], trust = c[13];
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T pi = p[i];
        p[i] = pi + neg_lr * (lamb_update(m[i], v[i], pi, c) * trust);
    }
}

// optax.adafactor. Kernel columns: gs 0, d 1, 1-d 2, eps 3, Ni 4, Nj 5, N(d1) 6, clip
// denominator 7, lr 8, parameter scale 9, momentum on 10, momentum 11, 1-momentum 12,
// ema in float32 13, weight_decay_rate 14, one 15. Meta (11 per tensor): start 0,
// factored 1, A 2, Ni 3, B 4, Nj 5, C 6, ROWR 7 (v_row is the R statistic), v_row 8,
// v_col 9, v 10 offsets.
#define OPTAX_META 11

// The R statistics of rows x0 .. x0+nx of matrix a (tasks: segment, a, x0, nx): one warp
// per (x, b, c), its lanes over y; s = d s + (1-d) mean_y(g^2 + eps) (the sum in double,
// rounded to T, then divided); where it is v_col, cf = 1/sqrt(s) too.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_factored_rows(
        const T* __restrict__ g, T* __restrict__ v_row, T* __restrict__ v_col,
        T* __restrict__ cf, const long long* __restrict__ tasks,
        const long long* __restrict__ meta, const T* __restrict__ coef, const long long ldc) {
    const long long* t = tasks + 4 * (long long)blockIdx.x;
    const long long seg = t[0], a = t[1], x0 = t[2], nx = t[3];
    const long long* mt = meta + OPTAX_META * seg;
    const T* c = coef + seg * ldc;
    const T gs = c[0], d = c[1], omd = c[2], eps = c[3], nj = c[5], one = c[15];
    const long long start = mt[0], ni = mt[3], nb = mt[4], m = mt[5], nc = mt[6];
    const bool rowr = mt[7] != 0;
    T* stat = rowr ? v_row : v_col;
    const long long off = rowr ? mt[8] : mt[9];
    const unsigned lane = threadIdx.x & 31u;
    const long long outputs = nx * nb * nc;
    for (long long o = (long long)(threadIdx.x >> 5); o < outputs; o += THREADS / 32) {
        const long long x = x0 + o / (nb * nc);
        const long long bc = o % (nb * nc);
        const long long bi = bc / nc, ci = bc % nc;
        const long long e0 = start + ((a * ni + x) * nb + bi) * m * nc + ci;
        double acc = 0.0;
        for (long long y = (long long)lane; y < m; y += 32) {
            const T gv = g[e0 + y * nc] * gs;
            acc += (double)(gv * gv + eps);
        }
        for (int s = 16; s > 0; s >>= 1) {
            acc += __shfl_down_sync(0xffffffffu, acc, s);
        }
        if (lane == 0) {
            const long long idx = off + ((a * ni + x) * nb + bi) * nc + ci;
            const T updated = d * stat[idx] + omd * ((T)acc / nj);
            stat[idx] = updated;
            if (!rowr) {
                cf[idx] = one / root(updated);
            }
        }
    }
}

// The C statistics of a stripe (tasks: segment, a, b, y0, ny; ny C consecutive elements
// per row, all Ni rows): one thread per element of the stripe, over x.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_factored_cols(
        const T* __restrict__ g, T* __restrict__ v_row, T* __restrict__ v_col,
        T* __restrict__ cf, const long long* __restrict__ tasks,
        const long long* __restrict__ meta, const T* __restrict__ coef, const long long ldc) {
    const long long* t = tasks + 5 * (long long)blockIdx.x;
    const long long seg = t[0], a = t[1], bi = t[2], y0 = t[3], ny = t[4];
    const long long* mt = meta + OPTAX_META * seg;
    const T* c = coef + seg * ldc;
    const T gs = c[0], d = c[1], omd = c[2], eps = c[3], ni_t = c[4], one = c[15];
    const long long start = mt[0], ni = mt[3], nb = mt[4], m = mt[5], nc = mt[6];
    const bool rowr = mt[7] != 0;
    T* stat = rowr ? v_col : v_row;
    const long long off = rowr ? mt[9] : mt[8];
    const long long width = ny * nc;
    for (long long j = (long long)threadIdx.x; j < width; j += THREADS) {
        double acc = 0.0;
        for (long long x = 0; x < ni; ++x) {
            const T gv = g[start + ((a * ni + x) * nb + bi) * m * nc + y0 * nc + j] * gs;
            acc += (double)(gv * gv + eps);
        }
        const long long idx = off + ((a * nb + bi) * m + y0) * nc + j;
        const T updated = d * stat[idx] + omd * ((T)acc / ni_t);
        stat[idx] = updated;
        if (rowr) {
            cf[idx] = one / root(updated);
        }
    }
}

// Per matrix (tasks: segment, first v_row index, count, stride): rf = 1/sqrt(v_row /
// mean(v_row)) over its entries, the mean's sum rounded to T, then divided by N(d1).
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_factored_norm(
        const T* __restrict__ v_row, T* __restrict__ rf, const long long* __restrict__ tasks,
        const T* __restrict__ coef, const long long ldc) {
    const long long* t = tasks + 4 * (long long)blockIdx.x;
    const long long first = t[1], count = t[2], stride = t[3];
    const T* c = coef + t[0] * ldc;
    double acc = 0.0;
    for (long long k = (long long)threadIdx.x; k < count; k += THREADS) {
        acc += (double)v_row[first + k * stride];
    }
    double unused = 0.0;
    block_sum2(acc, unused);
    const T mean = (T)acc / c[6];
    for (long long k = (long long)threadIdx.x; k < count; k += THREADS) {
        const long long idx = first + k * stride;
        rf[idx] = c[15] / root(v_row[idx] / mean);
    }
}

// U = g v^-1/2 (v = d v + (1-d)(g^2 + eps) where mode is not 1, an unfactored tensor) or
// (g rf) cf (factored). mode 0: the sum of U^2 per entry into out; 1 or 2: u = ((U / cd)
// lr) scale, [e = (1-mu) u + mu e, u = e], u += weight_decay_rate p, p -= u.
template <typename T>
__global__ void __launch_bounds__(THREADS) adamserve_optax_adafactor_update(
        T* __restrict__ p, const T* __restrict__ g, T* __restrict__ v,
        const T* __restrict__ rf, const T* __restrict__ cf, T* __restrict__ ema,
        const long long* __restrict__ bstart, const long long* __restrict__ bend,
        const long long* __restrict__ bseg, const long long* __restrict__ meta,
        const T* __restrict__ coef, const long long ldc, double* __restrict__ out,
        const int mode) {
    const long long b = (long long)blockIdx.x;
    const long long* mt = meta + OPTAX_META * bseg[b];
    const T* c = coef + bseg[b] * ldc;
    const T gs = c[0], d = c[1], omd = c[2], eps = c[3], cd = c[7], lr = c[8];
    const T prms = c[9], mom = c[11], omm = c[12], wdr = c[14], one = c[15];
    const bool mom_on = c[10] != T(0), narrow = c[13] != T(0);
    const long long start = mt[0];
    const bool factored = mt[1] != 0, rowr = mt[7] != 0;
    const long long ni = mt[3], nb = mt[4], m = mt[5], nc = mt[6];
    double acc = 0.0;
    const long long hi = bend[b];
    for (long long i = bstart[b] + (long long)threadIdx.x; i < hi; i += THREADS) {
        const T gi = g[i] * gs;
        T ui;
        if (factored) {
            const long long e = i - start;
            const long long ci = e % nc, q0 = e / nc;
            const long long y = q0 % m, q1 = q0 / m;
            const long long bi = q1 % nb, q2 = q1 / nb;
            const long long x = q2 % ni, a = q2 / ni;
            const long long ridx = ((a * ni + x) * nb + bi) * nc + ci;
            const long long cidx = ((a * nb + bi) * m + y) * nc + ci;
            ui = rowr ? (gi * rf[mt[8] + ridx]) * cf[mt[9] + cidx]
                      : (gi * rf[mt[8] + cidx]) * cf[mt[9] + ridx];
        } else {
            const long long vi_at = mt[10] + (i - start);
            T vi;
            if (mode == 1) {
                vi = v[vi_at];
            } else {
                vi = d * v[vi_at] + omd * (gi * gi + eps);
                v[vi_at] = vi;
            }
            ui = gi * (one / root(vi));
        }
        if (mode == 0) {
            acc += (double)ui * (double)ui;
            continue;
        }
        T u = ((ui / cd) * lr) * prms;
        if (mom_on) {
            u = omm * u + decayed(mom, ema[i], narrow);
            ema[i] = narrow ? (T)(float)u : u;
        }
        const T pi = p[i];
        if (wdr != T(0)) {
            u = u + wdr * pi;
        }
        p[i] = pi - u;
    }
    if (mode == 0) {
        double unused = 0.0;
        block_sum2(acc, unused);
        if (threadIdx.x == 0) {
            out[b] = acc;
        }
    }
}
"""
_KERNELS += ("optax_adam", "optax_adamax", "optax_lamb_sums", "optax_lamb",
             "optax_factored_rows", "optax_factored_cols", "optax_factored_norm",
             "optax_adafactor_update")
_COLUMNS.update({"optax.adam": 19, "optax.adamw": 19, "optax.amsgrad": 19, "optax.radam": 19,
                 "optax.adamax": 9, "optax.lamb": 14})
_OPTAX_ADAM = frozenset({"optax.adam", "optax.adamw", "optax.amsgrad", "optax.radam"})
_OPTAX_ADAFACTOR_COLUMNS = 16

# NVRTC options: IEEE division and sqrt are NVRTC's defaults; the one that must be
# changed is fmad, which would otherwise fuse ``a*b + c`` and change the rounding.
_OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true",
            "--ftz=false")


def _kernel_name(kernel: str, dtype_char: str) -> str:
    return f"adamserve_{kernel}<{_CTYPES[dtype_char]}>"


_lock = threading.Lock()
_module: Any = None
_functions: dict[tuple[str, str, int], Any] = {}


def _get_module() -> Any:
    global _module
    if _module is None:
        names = [_kernel_name(k, c) for k in _KERNELS for c in _CTYPES]
        _module = cupy.RawModule(code=_SOURCE, options=_OPTIONS, name_expressions=names)
    return _module


def _kernel(kernel: str, dtype: np.dtype[Any]) -> Any:
    """The compiled kernel for ``dtype`` on the current device (compiled on first use)."""
    key = (kernel, dtype.char, int(cupy.cuda.runtime.getDevice()))
    fn = _functions.get(key)
    if fn is None:
        if dtype.char not in _CTYPES:
            raise TypeError(f"CUDA kernels support float32 and float64 state, got {dtype}")
        with _lock:
            fn = _functions.get(key)
            if fn is None:
                fn = _get_module().get_function(_kernel_name(kernel, dtype.char))
                _functions[key] = fn
    return fn


def compile_all() -> None:
    """Compile and load every kernel now (otherwise done on first use)."""
    for k in _KERNELS:
        for c in _CTYPES:
            _kernel(k, np.dtype(c))


def device_count() -> int:
    """CUDA devices CuPy can see; 0 when there is none or the runtime fails. Never raises."""
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def device_name() -> str:
    """The current device's name, e.g. ``NVIDIA H100 80GB HBM3``."""
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:
        return f"unknown CUDA device ({exc})"


class CudaBackend:
    """The :class:`~adamserve.engine.backend.Backend` on CuPy arrays and the kernels above.

    Arrays live on the device that is current when they are created; kernels run on
    CuPy's current stream, so results are ordered with CuPy copies on that stream.
    """

    name = "cuda"
    block = BLOCK

    def __init__(self) -> None:
        self._dummy: dict[tuple[str, int], Array] = {}

    # -- memory --------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Total memory of the current device."""
        return int(cupy.cuda.Device().mem_info[1])

    def zeros(self, n: int, dtype: np.dtype[Any]) -> Array:
        return cupy.zeros(n, dtype=dtype)

    def to_device(self, host: npt.NDArray[Any]) -> Array:
        return cupy.ascontiguousarray(cupy.asarray(host))

    def to_host(self, x: Array) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = cupy.asnumpy(x)
        return out

    # -- helpers -------------------------------------------------------------

    def _absent(self, dtype: np.dtype[Any]) -> Array:
        """A one-element buffer passed for a slot that is not allocated (never touched)."""
        key = (dtype.char, int(cupy.cuda.runtime.getDevice()))
        d = self._dummy.get(key)
        if d is None:
            d = cupy.zeros(1, dtype=dtype)
            self._dummy[key] = d
        return d

    @staticmethod
    def _coef(coef: Array, dtype: np.dtype[Any], columns: int) -> tuple[Array, np.int64]:
        c = cupy.ascontiguousarray(cupy.asarray(coef, dtype=dtype))
        if c.ndim != 2 or c.shape[1] < columns:
            raise ValueError(
                f"coefficient matrix: expected [segments, >= {columns}], got {c.shape}")
        return c, np.int64(c.shape[1])

    @staticmethod
    def _check(param: Array, *buffers: Array) -> np.dtype[Any]:
        dtype: np.dtype[Any] = param.dtype
        if dtype.char not in _CTYPES:
            raise TypeError(f"CUDA kernels support float32 and float64 state, got {dtype}")
        for buf in buffers:
            if buf.dtype != dtype or buf.size != param.size:
                raise ValueError(
                    f"state buffers must all be {dtype} of {param.size} elements; got "
                    f"{buf.dtype} of {buf.size}")
        return dtype

    # -- kernels -------------------------------------------------------------

    def segment_sumsq(self, x: Array, blocks: Blocks, nseg: int) -> F64:
        nb = int(blocks.start.shape[0])
        if nb == 0:
            return np.zeros(nseg, dtype=np.float64)
        partial = cupy.empty(nb, dtype=np.float64)
        _kernel("sumsq", x.dtype)((nb,), (THREADS,), (x, blocks.start, blocks.end, partial))
        sums = np.bincount(blocks.host_seg, weights=cupy.asnumpy(partial), minlength=nseg)
        return np.asarray(sums, dtype=np.float64)

    def run(self, algorithm: str, slots: dict[str, Array], param: Array, grad: Array,
            blocks: Blocks, coef: Array) -> None:
        if any(not isinstance(v, cupy.ndarray) for v in slots.values()):  # narrow moments
            from adamserve.engine import kernels_cuda_quant

            kernels_cuda_quant.run_quantized(algorithm, slots, param, grad, blocks, coef)
            return
        a, s = algorithm, slots
        if a not in _COLUMNS or a == "lamb":
            raise ValueError(f"no CUDA kernel for {a!r}")
        nb = int(blocks.start.shape[0])
        dtype = self._check(param, grad, *s.values())
        c, ldc = self._coef(coef, dtype, _COLUMNS[a])
        if nb == 0:
            return
        b = (blocks.start, blocks.end, blocks.seg, c, ldc)
        grid, threads = (nb,), (THREADS,)
        if a in ("adam", "adamw"):
            vmax = s.get("max_exp_avg_sq")
            has_vmax = np.int32(vmax is not None)
            if vmax is None:
                vmax = self._absent(dtype)
            _kernel("adam", dtype)(grid, threads, (
                param, grad, s["exp_avg"], s["exp_avg_sq"], vmax, has_vmax, *b))
        elif a == "nadam":
            _kernel("nadam", dtype)(grid, threads, (
                param, grad, s["exp_avg"], s["exp_avg_sq"], *b))
        elif a == "radam":
            _kernel("radam", dtype)(grid, threads, (
                param, grad, s["exp_avg"], s["exp_avg_sq"], *b))
        elif a == "adamax":
            _kernel("adamax", dtype)(grid, threads, (
                param, grad, s["exp_avg"], s["exp_inf"], *b))
        elif a == "adagrad":
            _kernel("adagrad", dtype)(grid, threads, (param, grad, s["sum"], *b))
        elif a in ("adamw_schedule_free", "radam_schedule_free"):
            _kernel("schedule_free", dtype)(grid, threads, (
                param, grad, s["exp_avg_sq"], s["z"], *b))
        elif a == "muon":  # the momentum; the update goes over grad
            _kernel("muon_momentum", dtype)(grid, threads, (grad, s["momentum_buffer"], *b))
        elif a == "sparse_adam":  # blocks over the touched rows only
            _kernel("sparse_adam", dtype)(grid, threads, (
                param, grad, s["exp_avg"], s["exp_avg_sq"], *b))
        elif a in _OPTAX_ADAM:
            nu_max = s.get("nu_max")
            _kernel("optax_adam", dtype)(grid, threads, (
                param, grad, s["mu"], s["nu"], self._absent(dtype) if nu_max is None else nu_max,
                np.int32(nu_max is not None), *b))
        elif a == "optax.adamax":
            _kernel("optax_adamax", dtype)(grid, threads, (param, grad, s["mu"], s["nu"], *b))
        elif a == "optax.lamb":  # the second pass (engine.optax_lamb): coef holds the trust
            _kernel("optax_lamb", dtype)(grid, threads, (param, s["mu"], s["nu"], *b))
        else:  # rmsprop
            buf = s.get("momentum_buffer")
            gavg = s.get("grad_avg")
            _kernel("rmsprop", dtype)(grid, threads, (
                param, grad, s["square_avg"],
                self._absent(dtype) if buf is None else buf, np.int32(buf is not None),
                self._absent(dtype) if gavg is None else gavg, np.int32(gavg is not None),
                *b))

    def lamb_moments(self, slots: dict[str, Array], param: Array, grad: Array, blocks: Blocks,
                     coef: Array) -> tuple[F64, F64]:
        if any(not isinstance(v, cupy.ndarray) for v in slots.values()):  # narrow moments
            from adamserve.engine import kernels_cuda_quant

            sums: tuple[F64, F64] = kernels_cuda_quant.lamb_moments_quantized(
                slots, param, grad, blocks, coef)
            return sums
        nb = int(blocks.start.shape[0])
        m, v = slots["exp_avg"], slots["exp_avg_sq"]
        dtype = self._check(param, grad, m, v)
        c, ldc = self._coef(coef, dtype, _COLUMNS["lamb"])
        if nb == 0:
            empty = np.zeros(0, dtype=np.float64)
            return empty, empty.copy()
        sums = cupy.empty(2 * nb, dtype=np.float64)
        _kernel("lamb_moments", dtype)((nb,), (THREADS,), (
            param, grad, m, v, blocks.start, blocks.end, blocks.seg, c, ldc, sums,
            np.int64(nb)))
        host: F64 = cupy.asnumpy(sums)
        return host[:nb], host[nb:]

    def scaled_sub(self, param: Array, update: Array, blocks: Blocks, scale: Array) -> None:
        nb = int(blocks.start.shape[0])
        dtype = self._check(param, update)
        sc = cupy.ascontiguousarray(cupy.asarray(scale, dtype=dtype))
        if nb == 0:
            return
        _kernel("scaled_sub", dtype)((nb,), (THREADS,), (
            param, update, blocks.start, blocks.end, blocks.seg, sc))

    def lerp_into(self, param: Array, end: Array, blocks: Blocks, coef: Array) -> None:
        nb = int(blocks.start.shape[0])
        dtype = self._check(param, end)
        c, ldc = self._coef(coef, dtype, 2)
        if nb == 0:
            return
        _kernel("lerp_into", dtype)((nb,), (THREADS,), (
            param, end, blocks.start, blocks.end, blocks.seg, c, ldc))

    def adafactor_stats(self, grad: Array, row_var: Array, col_var: Array, tasks: FactorTasks,
                        coef: Array) -> Array:
        dtype = row_var.dtype
        c, ldc = self._coef(coef, dtype, 9)
        row_sums = cupy.zeros(max(tasks.row_count, 1), dtype=np.float64)
        partial = cupy.zeros((max(len(tasks.cols), 1), tasks.stripe), dtype=np.float64)
        means = cupy.ones(max(tasks.batch_count, 1), dtype=dtype)
        threads = (THREADS,)
        for kernel, table, args in (
                ("adafactor_row_sums", tasks.rows, (grad, tasks.rows, c, ldc, row_sums)),
                ("adafactor_col_sums", tasks.cols, (grad, tasks.cols, c, ldc, partial)),
                ("adafactor_row_factors", tasks.rows, (row_var, row_sums, tasks.rows, c, ldc)),
                ("adafactor_col_factors", tasks.stripes,
                 (col_var, partial, tasks.stripes, c, ldc)),
                ("adafactor_means", tasks.batches, (row_var, tasks.batches, c, ldc, means))):
            if len(table):
                _kernel(kernel, dtype)((len(table),), threads, args)
        return means

    def adafactor_update(self, param: Array, grad: Array, variance: Array, row_var: Array,
                         col_var: Array, row_means: Array, blocks: Blocks, meta: Array,
                         coef: Array, apply: bool) -> F64 | None:
        nb = int(blocks.start.shape[0])
        dtype = self._check(param, grad)
        c, ldc = self._coef(coef, dtype, 9)
        out = cupy.zeros(max(nb, 1), dtype=np.float64)
        if nb:
            # a slot without elements still needs a pointer the kernel never reads
            bufs = [x if x.size else self._absent(dtype) for x in (variance, row_var, col_var)]
            _kernel("adafactor_update", dtype)((nb,), (THREADS,), (
                param, grad, *bufs, row_means, blocks.start, blocks.end, blocks.seg, meta, c,
                ldc, out, np.int32(apply)))
        host: F64 = cupy.asnumpy(out)[:nb]
        return None if apply else host

    def decay_add(self, param: Array, update: Array, blocks: Blocks, coef: Array) -> None:
        nb = int(blocks.start.shape[0])
        dtype = self._check(param, update)
        c, ldc = self._coef(coef, dtype, 2)
        if nb == 0:
            return
        _kernel("decay_add", dtype)((nb,), (THREADS,), (
            param, update, blocks.start, blocks.end, blocks.seg, c, ldc))

    def newton_schulz(self, x: Array, coefficients: tuple[float, float, float], steps: int,
                      eps: float) -> Array:
        """The CPU's iteration on CuPy arrays: every GEMM a cuBLAS call, in the state
        dtype (float32 GEMMs are IEEE unless CuPy's TF32 mode is turned on)."""
        return newton_schulz(x, coefficients, steps, eps)

    # -- optax (engine.optax_lamb, engine.optax_adafactor) -------------------------------

    def optax_lamb_sums(self, slots: dict[str, Array], param: Array, grad: Array,
                        blocks: Blocks, coef: Array) -> tuple[F64, F64]:
        """optax.lamb's first pass: the moments, and Σ p² and Σ u² per block."""
        nb = int(blocks.start.shape[0])
        m, v = slots["mu"], slots["nu"]
        dtype = self._check(param, grad, m, v)
        c, ldc = self._coef(coef, dtype, _COLUMNS["optax.lamb"])
        if nb == 0:
            empty = np.zeros(0, dtype=np.float64)
            return empty, empty.copy()
        sums = cupy.empty(2 * nb, dtype=np.float64)
        _kernel("optax_lamb_sums", dtype)((nb,), (THREADS,), (
            param, grad, m, v, blocks.start, blocks.end, blocks.seg, c, ldc, sums,
            np.int64(nb)))
        host: F64 = cupy.asnumpy(sums)
        return host[:nb], host[nb:]

    def optax_adafactor_stats(self, grad: Array, v_row: Array, v_col: Array, rf: Array,
                              cf: Array, rows: Array, cols: Array, norms: Array, meta: Array,
                              coef: Array) -> None:
        """optax.adafactor's factored statistics and their factors (kernels_cpu's)."""
        dtype = grad.dtype
        c, ldc = self._coef(coef, dtype, _OPTAX_ADAFACTOR_COLUMNS)
        bufs = [x if x.size else self._absent(dtype) for x in (v_row, v_col, cf)]
        threads = (THREADS,)
        if len(rows):
            _kernel("optax_factored_rows", dtype)((len(rows),), threads, (
                grad, *bufs, rows, meta, c, ldc))
        if len(cols):
            _kernel("optax_factored_cols", dtype)((len(cols),), threads, (
                grad, *bufs, cols, meta, c, ldc))
        if len(norms):
            _kernel("optax_factored_norm", dtype)((len(norms),), threads, (
                bufs[0], rf if rf.size else self._absent(dtype), norms, c, ldc))

    def optax_adafactor_update(self, param: Array, grad: Array, v: Array, rf: Array, cf: Array,
                               ema: Array | None, blocks: Blocks, meta: Array, coef: Array,
                               mode: int) -> F64 | None:
        """optax.adafactor's update (kernels_cpu's): ``mode`` 0 the sums of U² per block,
        1 the apply after them, 2 the apply without them."""
        nb = int(blocks.start.shape[0])
        dtype = self._check(param, grad)
        c, ldc = self._coef(coef, dtype, _OPTAX_ADAFACTOR_COLUMNS)
        out = cupy.zeros(max(nb, 1), dtype=np.float64)
        if nb:
            bufs = [x if x is not None and x.size else self._absent(dtype)
                    for x in (v, rf, cf, ema)]
            _kernel("optax_adafactor_update", dtype)((nb,), (THREADS,), (
                param, grad, *bufs, blocks.start, blocks.end, blocks.seg, meta, c, ldc, out,
                np.int32(mode)))
        host: F64 = cupy.asnumpy(out)[:nb]
        return host if mode == 0 else None
