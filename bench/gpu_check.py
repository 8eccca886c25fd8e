#!/usr/bin/env python
"""GPU check: adamserve's CUDA kernels on one device, against the CPU kernels and torch.

Run from anywhere on a machine with CuPy and a CUDA device (the package need not be
installed; ``<repo>/server`` is put on ``sys.path`` here)::

    python bench/gpu_check.py            # 2**24 fp32 elements per algorithm
    python bench/gpu_check.py --quick    # 2**20 elements, smaller copy buffer

It prints, as markdown:

1. parity: every algorithm (and a few option sets) for a few steps on the CUDA
   backend and on the CPU backend (numba), float32 and float64, with the largest
   relative difference over the parameters and every state slot (skip with
   ``--no-parity``; needs numba);
2. the device-to-device copy rate (read + write bytes per second), the
   memory-bandwidth yardstick;
3. per algorithm: elements/s of the bare kernel path (``backend.run`` or LAMB's
   two passes), of ``FlatOptimizer.step()`` (host coefficients and launch, with
   and without the non-finite check), of torch's fastest CUDA implementation
   (fused, else foreach), their ratios, and the fraction of the copy rate each one
   achieves given the bytes the algorithm has to move per element.

Timings use CUDA events over ``--iters`` steps after ``--warmup`` steps. torch is
optional: without it (or without CUDA in it) its columns read n/a.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

import numpy as np  # noqa: E402

try:
    import cupy
except ImportError as exc:
    print(f"gpu_check: CuPy is not importable ({exc}); nothing to check", file=sys.stderr)
    sys.exit(2)

from adamserve.engine import algorithms as alg  # noqa: E402
from adamserve.engine import kernels_cuda  # noqa: E402
from adamserve.engine.backend import Blocks, make_blocks  # noqa: E402
from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec  # noqa: E402

ALGORITHMS = ("adam", "adamw", "nadam", "radam", "adamax", "adagrad", "rmsprop", "lamb")

# State accesses per element at the default options, each of 4 bytes in fp32:
# param read+write, grad read, each slot read+write. LAMB needs two passes (the
# trust ratio is a reduction over each tensor that must finish before the update):
# pass 1 reads p, g, m, v and writes m, v and the update r (over g); pass 2 reads
# p, r and writes p.
ACCESSES = {"adam": 7, "adamw": 7, "nadam": 7, "radam": 7, "adamax": 7, "adagrad": 5,
            "rmsprop": 5, "lamb": 10}

TORCH_CLASSES = {"adam": "Adam", "adamw": "AdamW", "nadam": "NAdam", "radam": "RAdam",
                 "adamax": "Adamax", "adagrad": "Adagrad", "rmsprop": "RMSprop"}

PARITY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("adam", {}), ("adam", {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    ("adamw", {}), ("nadam", {}), ("nadam", {"decoupled_weight_decay": True,
                                             "weight_decay": 0.1}),
    ("radam", {}), ("adamax", {"weight_decay": 0.1}),
    ("adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("rmsprop", {}), ("rmsprop", {"centered": True, "momentum": 0.9}),
    ("lamb", {}), ("lamb", {"weight_decay": 0.1}),
]
PARITY_TOL = {"float32": 1e-5, "float64": 1e-12}


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def fmt_frac(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cupy_seconds_per_call(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return float(cupy.cuda.get_elapsed_time(start, stop)) / 1e3 / iters


def layout_for(n: int) -> Layout:
    """A handful of tensors of mixed sizes adding up to ``n`` elements."""
    sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8 - 4099, 4096, 3]
    assert min(sizes) > 0 and sum(sizes) == n
    return Layout(tuple(TensorSpec(f"t{i}", (s,)) for i, s in enumerate(sizes)))


# -- parity ----------------------------------------------------------------------


def parity(steps: int = 5) -> bool:
    from adamserve.engine.kernels_cpu import CpuBackend

    layout = Layout((TensorSpec("a", (100, 100)), TensorSpec("b", (1,)),
                     TensorSpec("c", (37, 29), 1), TensorSpec("d", (45000,), 1)))
    rng = np.random.default_rng(0)
    init = rng.standard_normal(layout.size)
    grads = [rng.standard_normal(layout.size) * 0.5 + 0.1 for _ in range(steps)]
    rows: list[list[str]] = []
    ok = True
    for algorithm, opts in PARITY_CASES:
        row = [algorithm, ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"]
        for dtype in ("float32", "float64"):
            groups = [{**opts, "lr": 1e-2}, {**opts, "lr": 3e-3}]
            opt = {name: FlatOptimizer(algorithm, layout, groups, backend=be, dtype=dtype,
                                       params=init)
                   for name, be in (("cuda", kernels_cuda.CudaBackend()),
                                    ("cpu", CpuBackend()))}
            for g in grads:
                for o in opt.values():
                    o.grad[...] = o.backend.to_device(g.astype(o.dtype))
                    o.step()
            worst, where = 0.0, ""
            cu, cp = opt["cuda"], opt["cpu"]
            names = ["param", "grad", *cp.slot_names()]
            for name in names:
                a = cu.backend.to_host(cu.param if name == "param" else
                                       cu.grad if name == "grad" else cu.slots[name])
                b = cp.param if name == "param" else cp.grad if name == "grad" else cp.slots[
                    name]
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                err = float(np.max(np.abs(a64 - b64)) / (np.max(np.abs(b64)) + 1e-30))
                if not np.isfinite(err) or err > worst:
                    worst, where = err, name
            good = bool(np.isfinite(worst) and worst <= PARITY_TOL[dtype])
            ok &= good
            row.append(f"{worst:.1e}{'' if good else ' FAIL'}" + (f" ({where})" if where else ""))
        rows.append(row)
    print(table(["algorithm", "options", "float32 max rel diff", "float64 max rel diff"], rows))
    print(f"\nparity: {'ok' if ok else 'FAILED'} (tolerance: float32 {PARITY_TOL['float32']:g}, "
          f"float64 {PARITY_TOL['float64']:g}; {steps} steps, two groups, 4 tensors)")
    return ok


# -- bandwidth yardstick ---------------------------------------------------------


def copy_rate(nbytes: int, iters: int) -> tuple[float, str]:
    """Best device-to-device copy rate, counting read + write bytes."""
    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    stream = cupy.cuda.get_current_stream()

    def memcpy() -> None:
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

    def kernel() -> None:
        cupy.copyto(dst, src)

    best, how = 0.0, ""
    for name, fn in (("cudaMemcpyAsync", memcpy), ("cupy.copyto", kernel)):
        t = cupy_seconds_per_call(fn, 2, iters)
        rate = 2 * src.nbytes / t
        if rate > best:
            best, how = rate, name
    return best, how


# -- adamserve -------------------------------------------------------------------


def coefficients(opt: FlatOptimizer, nseg: int) -> Any:
    """One step's coefficient matrix on the device, as FlatOptimizer.step builds it."""
    values = {k: np.full(nseg, float(v)) for k, v in opt.groups[0].items()}
    h = alg.SegmentHyper(values, np.ones(nseg, dtype=np.int64), np.ones(nseg))
    coef64 = alg.coefficients(opt.algorithm, h, values["lr"], np.ones(nseg))
    return opt.backend.to_device(coef64.astype(opt.dtype))


def bare_step(backend: Any, algorithm: str, opt: FlatOptimizer) -> Callable[[], None]:
    """The kernel path of one step without FlatOptimizer: fixed coefficients and blocks."""
    nseg = len(opt.layout)
    blocks: Blocks = make_blocks(backend, opt.layout.offsets)
    coef = coefficients(opt, nseg)
    if algorithm == "lamb":
        scale = backend.to_device(np.full(nseg, 1e-3, dtype=np.float32))

        def lamb() -> None:
            backend.lamb_moments(opt.slots, opt.param, opt.grad, blocks, coef)
            backend.scaled_sub(opt.param, opt.grad, blocks, scale)

        return lamb

    def run() -> None:
        backend.run(algorithm, opt.slots, opt.param, opt.grad, blocks, coef)

    return run


def adamserve_timings(algorithm: str, layout: Layout, warmup: int, iters: int
                      ) -> dict[str, float]:
    """Seconds per step: bare kernel path, step() without and with the non-finite check."""
    backend = kernels_cuda.CudaBackend()
    out: dict[str, float] = {}
    n = layout.size
    for label, check in (("step", False), ("step_check", True)):
        opt = FlatOptimizer(algorithm, layout, [{}], backend=backend, dtype="float32",
                            skip_nonfinite=check)
        opt.param[...] = cupy.random.standard_normal(n, dtype=cupy.float32)
        opt.grad[...] = cupy.random.standard_normal(n, dtype=cupy.float32) * 0.01
        out[label] = cupy_seconds_per_call(opt.step, warmup, iters)
        if label == "step":
            out["kernel"] = cupy_seconds_per_call(bare_step(backend, algorithm, opt), warmup,
                                                  iters)
    return out


# -- torch -----------------------------------------------------------------------


def load_torch() -> tuple[Any, str]:
    try:
        import torch
    except Exception as exc:
        return None, f"torch is not importable ({exc})"
    try:
        if not torch.cuda.is_available():
            return None, "torch sees no CUDA device"
    except Exception as exc:
        return None, f"torch.cuda failed ({exc})"
    return torch, f"torch {torch.__version__}"


def torch_timing(torch: Any, algorithm: str, layout: Layout, warmup: int, iters: int
                 ) -> tuple[float | None, str]:
    """Seconds per step of torch's fastest CUDA implementation (fused, else foreach)."""
    if algorithm not in TORCH_CLASSES:
        return None, "n/a (not in torch)"
    cls = getattr(torch.optim, TORCH_CLASSES[algorithm])
    best: tuple[float | None, str] = (None, "n/a")
    notes: list[str] = []
    for impl in ("fused", "foreach"):
        params = [torch.randn(t.shape, device="cuda", dtype=torch.float32) for t in
                  layout.tensors]
        for p in params:
            p.requires_grad_(True)
            p.grad = torch.randn_like(p) * 0.01
        try:
            opt = cls(params, **{impl: True})
            opt.step()
            torch.cuda.synchronize()
        except Exception as exc:
            notes.append(f"{impl}: {type(exc).__name__}")
            del params
            continue
        for _ in range(warmup):
            opt.step()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            opt.step()
        stop.record()
        stop.synchronize()
        t = start.elapsed_time(stop) / 1e3 / iters
        if best[0] is None or t < best[0]:
            best = (t, impl)
        del opt, params
    torch.cuda.empty_cache()
    if best[0] is None:
        return None, "n/a (" + "; ".join(notes) + ")"
    return best


# -- main ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2**20 elements, 256 MiB copy")
    ap.add_argument("--elements", type=int, default=None, help="elements per algorithm")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-parity", action="store_true", help="skip the CPU parity check")
    ap.add_argument("--no-torch", action="store_true", help="skip torch")
    args = ap.parse_args(argv)
    n = args.elements or (1 << 20 if args.quick else 1 << 24)
    copy_bytes = (256 << 20) if args.quick else (1 << 30)
    t_start = time.perf_counter()

    count = kernels_cuda.device_count()
    if count == 0:
        print("gpu_check: CuPy sees no CUDA device", file=sys.stderr)
        return 2
    print(f"# adamserve GPU check\n\ndevice: {kernels_cuda.device_name()} "
          f"(CUDA devices visible: {count}); CuPy {cupy.__version__}, "
          f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
          f"driver {cupy.cuda.runtime.driverGetVersion()}")
    t0 = time.perf_counter()
    kernels_cuda.compile_all()
    print(f"NVRTC compile + load of all kernels: {time.perf_counter() - t0:.1f} s")

    ok = True
    if not args.no_parity:
        print("\n## parity with the CPU kernels\n")
        t0 = time.perf_counter()
        try:
            ok = parity()
        except Exception as exc:
            ok = False
            print(f"parity check failed to run: {type(exc).__name__}: {exc}")
        print(f"(parity took {time.perf_counter() - t0:.1f} s, numba compile included)")

    print("\n## throughput\n")
    rate, how = copy_rate(copy_bytes, max(3, args.iters // 4))
    cupy.get_default_memory_pool().free_all_blocks()
    print(f"copy rate ({copy_bytes >> 20} MiB buffer, read + write bytes, best of {how}): "
          f"{rate / 1e9:.0f} GB/s")

    torch, torch_note = (None, "skipped") if args.no_torch else load_torch()
    print(f"torch: {torch_note}")
    layout = layout_for(n)
    print(f"elements per algorithm: {n} fp32 in {len(layout)} tensors; {args.iters} steps "
          f"timed after {args.warmup} warm-up steps; Gelem/s = 1e9 elements per second\n")

    header = ["algorithm", "B/elem", "kernel Gelem/s", "kernel % copy BW", "step() Gelem/s",
              "step()+nonfinite check Gelem/s", "host overhead us/step", "torch impl",
              "torch Gelem/s", "torch % copy BW", "kernel / torch", "step() / torch"]
    rows: list[list[str]] = []
    for algorithm in ALGORITHMS:
        bpe = 4 * ACCESSES[algorithm]
        try:
            t = adamserve_timings(algorithm, layout, args.warmup, args.iters)
            cupy.get_default_memory_pool().free_all_blocks()
        except Exception as exc:
            rows.append([algorithm, str(bpe), f"error: {type(exc).__name__}: {exc}"]
                        + ["n/a"] * (len(header) - 3))
            ok = False
            continue
        k, s, sc = n / t["kernel"], n / t["step"], n / t["step_check"]
        tt: float | None = None
        impl = "n/a"
        if torch is not None:
            try:
                tt, impl = torch_timing(torch, algorithm, layout, args.warmup, args.iters)
            except Exception as exc:
                impl = f"n/a ({type(exc).__name__})"
        tr = None if tt is None else n / tt
        rows.append([
            algorithm, str(bpe), fmt_rate(k), fmt_frac(k * bpe / rate), fmt_rate(s),
            fmt_rate(sc), f"{(t['step'] - t['kernel']) * 1e6:.0f}", impl, fmt_rate(tr),
            fmt_frac(None if tr is None else tr * bpe / rate),
            fmt_ratio(None if tr is None else k / tr),
            fmt_ratio(None if tr is None else s / tr)])
        print(f"  {algorithm}: done", file=sys.stderr, flush=True)
    print(table(header, rows))
    print("\nB/elem: bytes each element of state must move per step at the default options "
          "(fp32; LAMB: two passes). % copy BW: achieved bytes/s over the copy rate. "
          "step(): FlatOptimizer.step() without the non-finite check; +nonfinite check adds "
          "the gradient norm pass and a device-to-host sync. host overhead = step() - kernel.")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s; parity "
          f"{'skipped' if args.no_parity else 'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
