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

from adamserve.engine.backend import Array, Blocks

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

_KERNELS = ("sumsq", "adam", "nadam", "radam", "adamax", "adagrad", "rmsprop",
            "lamb_moments", "scaled_sub", "schedule_free", "lerp_into")

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
