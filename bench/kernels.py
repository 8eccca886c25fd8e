"""Optimizer kernels on the CPU: adamserve vs torch's fastest, and vs the memory floor.

One run prints a markdown table, for every algorithm on N fp32 elements (default
16M):

* adamserve ``FlatOptimizer.step()`` elements/s, as a server runs it (non-finite
  check on), and the bare kernel (``skip_nonfinite=False``);
* torch's fastest CPU implementation of the same algorithm (``fused=True`` where
  torch has a fused CPU kernel, else ``foreach=True``) on one tensor of N elements;
  for the schedule-free pair, which torch lacks, schedulefree's (its default,
  foreach); Muon runs on one ``--muon-shape`` matrix instead (torch's Muon: one
  implementation, its Newton-Schulz iteration in bfloat16; ours in fp32 GEMMs, so
  Muon's floor counts only its elementwise passes); Adafactor runs on one matrix of
  ``--adafactor-rows`` rows (its factored statistics), against torch's foreach path;
  SparseAdam runs on one ``--sparse-shape`` embedding whose gradient touches
  ``--sparse-fraction`` of its rows (random, distinct), against torch.optim.SparseAdam's
  step on the same coalesced sparse gradient; its elements are the touched ones, its
  floor the bytes of the touched rows read and written;
* ratio = adamserve step / torch;
* floor = bytes the algorithm must move per element / memory-copy rate measured in
  this run (the faster of ``np.copyto`` and a threaded copy of a buffer much larger
  than the caches, counting bytes read + written); reported as the fraction of that
  floor the kernel reaches.

Each figure is the best of ``--repeat`` interleaved rounds (see ``best_of``).

    python bench/kernels.py [--elements 16777216] [--repeat 10] [--muon-shape 1024x1024]
                            [--sparse-shape 1000000x64] [--sparse-fraction 0.01]

``--only-quantized`` prints instead the fused kernels over int8 and bfloat16 moments
(engine/kernels_quant.py) beside the float32 kernel on the same N elements: bare kernel
calls, elements/s, the bytes each really moves per element (``quantized_bytes``) per
second, and that rate as a fraction of the copy rate (the floor, as above).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numba
import numpy as np

from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec

# Bytes each algorithm must move per fp32 element: param r+w, grad r, each slot r+w.
# LAMB makes two passes (moments + update, then the trust-ratio-scaled apply).
BYTES = {
    "adam": 28, "adamw": 28, "adam+amsgrad": 36, "nadam": 28, "radam": 28, "adamax": 28,
    "adagrad": 20, "rmsprop": 20, "lamb": 40,
    "adamw_schedule_free": 28, "radam_schedule_free": 28,  # y and z r+w, g r, v r+w
    "muon": 28,  # momentum (g, buf r+w), apply (p r+w, u r); the GEMMs are compute-bound
    # ||p|| (p r), row and column sums (g r twice), ||U|| (g r), apply (g r, p r+w); the
    # factored statistics are O(rows + cols)
    "adafactor": 28,
    "sparse_adam": 28,  # of the touched rows only: p, m, v r+w, g r
}
TORCH = {
    "adam": ("Adam", {}, True), "adamw": ("AdamW", {}, True),
    "adam+amsgrad": ("Adam", {"amsgrad": True}, True), "nadam": ("NAdam", {}, False),
    "radam": ("RAdam", {}, False), "adamax": ("Adamax", {}, False),
    "adagrad": ("Adagrad", {}, True), "rmsprop": ("RMSprop", {}, False),
}
# schedulefree's classes (the oracle of the schedule-free pair); they step in train mode
SCHEDULE_FREE = {"adamw_schedule_free": "AdamWScheduleFree",
                 "radam_schedule_free": "RAdamScheduleFree"}


def melem(rate: float) -> str:
    """Elements/s in millions: whole above 100, three significant digits below (Muon's)."""
    m = rate / 1e6
    return f"{m:.0f}" if not m < 100 else f"{m:#.3g}"


def best_of(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Seconds per call of each function: the best of ``repeat`` interleaved rounds.

    Interleaving puts every contender through the same moments of a shared, noisy
    machine; the best round is the one least disturbed.
    """
    for fn in fns.values():
        fn()
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@numba.njit(parallel=True, cache=True)
def _parallel_copy(dst: np.ndarray, src: np.ndarray) -> None:  # type: ignore[type-arg]
    for i in numba.prange(src.shape[0]):
        dst[i] = src[i]


def copy_rate(n: int, repeat: int) -> float:
    """Bytes read + written per second by the faster of np.copyto and a threaded copy."""
    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    t = best_of({"np": lambda: np.copyto(dst, src), "par": lambda: _parallel_copy(dst, src)},
                repeat)
    return 2 * src.nbytes / min(t.values())


def ours(name: str, shape: tuple[int, ...], check: bool) -> Callable[[], object]:
    algo, opts = ("adam", {"amsgrad": True}) if name == "adam+amsgrad" else (name, {})
    if name in SCHEDULE_FREE:
        opts = {"train_mode": True}
    n = int(np.prod(shape))
    layout = Layout((TensorSpec("w", shape),))
    rng = np.random.default_rng(1)
    opt = FlatOptimizer(algo, layout, [opts], params=rng.standard_normal(n, dtype=np.float32),
                        skip_nonfinite=check)
    opt.grad[:] = rng.standard_normal(n, dtype=np.float32) * 1e-3
    return opt.step


def sparse_rows(shape: tuple[int, ...], fraction: float) -> np.ndarray:  # type: ignore[type-arg]
    """The touched rows: ``fraction`` of ``shape[0]``, random and distinct, sorted."""
    k = max(1, round(shape[0] * fraction))
    return np.sort(np.random.default_rng(2).choice(shape[0], size=k, replace=False))


def sparse_ours(shape: tuple[int, ...], rows: np.ndarray,  # type: ignore[type-arg]
                check: bool) -> Callable[[], object]:
    """SparseAdam's step over ``rows`` (the rest of the gradient buffer is never read)."""
    n, width = int(np.prod(shape)), int(np.prod(shape[1:]))
    rng = np.random.default_rng(1)
    opt = FlatOptimizer("sparse_adam", Layout((TensorSpec("emb", shape),)),
                        params=rng.standard_normal(n, dtype=np.float32), skip_nonfinite=check)
    opt.grad.reshape(shape[0], width)[rows] = rng.standard_normal(
        (len(rows), width), dtype=np.float32) * 1e-3
    given = [rows.astype(np.int64)]
    return lambda: opt.step(rows=given)


def sparse_theirs(shape: tuple[int, ...], rows: np.ndarray  # type: ignore[type-arg]
                  ) -> tuple[Callable[[], object] | None, str]:
    try:
        import torch
    except ImportError:
        return None, "n/a"
    p = torch.nn.Parameter(torch.randn(shape))
    values = torch.randn(len(rows), *shape[1:]) * 1e-3
    p.grad = torch.sparse_coo_tensor(torch.as_tensor(rows)[None], values, shape).coalesce()
    return torch.optim.SparseAdam([p]).step, "SparseAdam"


def theirs(name: str, shape: tuple[int, ...]) -> tuple[Callable[[], object] | None, str]:
    try:
        import torch
    except ImportError:
        return None, "n/a"
    n = int(np.prod(shape))
    if name == "adafactor":  # torch's multi-tensor path (its default is the per-tensor loop)
        a = torch.nn.Parameter(torch.randn(shape))
        a.grad = torch.randn(shape) * 1e-3
        return torch.optim.Adafactor([a], foreach=True).step, "foreach"
    if name == "muon":  # torch's only implementation
        w = torch.nn.Parameter(torch.randn(shape))
        w.grad = torch.randn(shape) * 1e-3
        return torch.optim.Muon([w]).step, "bf16 NS"
    if name in SCHEDULE_FREE:
        try:
            import schedulefree
        except ImportError:
            return None, "n/a"
        q = torch.nn.Parameter(torch.randn(n))
        q.grad = torch.randn(n) * 1e-3
        sf = getattr(schedulefree, SCHEDULE_FREE[name])([q])
        sf.train()
        return sf.step, "schedulefree"
    if name not in TORCH:
        return None, "none"
    cls_name, opts, has_fused = TORCH[name]
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n) * 1e-3
    cls = getattr(torch.optim, cls_name)
    impl = "fused" if has_fused else "foreach"
    try:
        opt = cls([p], **opts, **{impl: True})
        opt.step()
    except (RuntimeError, TypeError):
        impl = "foreach"
        opt = cls([p], **opts, foreach=True)
    return opt.step, impl


# -- quantised moments (--only-quantized) ----------------------------------------------------

QUANTIZED = ("adam", "adam+amsgrad", "nadam", "radam", "adamax", "lamb")


def quantized_bytes(name: str, state: str) -> float:
    """Bytes one fused pass moves per element: param r+w and grad r (LAMB: param r, its
    update r written over grad), and each moment r+w: float32 8, bfloat16 4, int8 its code
    2 plus its block's scale 8 / QBLOCK."""
    from adamserve.engine import quantize

    slot = {"float32": 8.0, "bfloat16": 4.0, "int8": 2.0 + 8.0 / quantize.QBLOCK}[state]
    return 12.0 + slot * (3 if name == "adam+amsgrad" else 2)


def quantized_kernel(name: str, state: str, n: int) -> Callable[[], object]:
    """One bare fused kernel call over ``state`` moments of one tensor of n elements, with
    real coefficients (engine.algorithms) of a step after the first."""
    from adamserve.engine import algorithms as alg
    from adamserve.engine import kernels_quant, quantize
    from adamserve.engine.backend import make_blocks
    from adamserve.engine.kernels_cpu import CpuBackend

    algo, alias = alg.parse_algorithm("amsgrad" if name == "adam+amsgrad" else name)
    h = alg.resolve_hyperparameters(algo, alias)
    values = {k: np.array([float(v)]) for k, v in h.items()}
    coef = alg.coefficients(algo, alg.SegmentHyper(values, np.array([10]), np.ones(1)),
                            values["lr"], np.ones(1)).astype(np.float32)
    backend = CpuBackend()
    offsets = np.array([0, n], dtype=np.int64)
    blocks = make_blocks(backend, offsets)
    rng = np.random.default_rng(1)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    names = alg.SPECS[algo].slots(h)
    start = {s: np.abs(rng.standard_normal(n, dtype=np.float32)) * np.float32(1e-3) for s in names}
    slots: dict[str, object] = {
        s: v if state == "float32" else quantize.quantize_int8(v, offsets, s == "exp_avg")
        if state == "int8" else quantize.to_bf16(v, seed=1) for s, v in start.items()}
    if name == "lamb":
        run = kernels_quant.lamb_moments_quantized if state != "float32" else backend.lamb_moments
        return lambda: run(slots, p, g, blocks, coef)
    if state == "float32":
        return lambda: backend.run(algo.value, slots, p, g, blocks, coef)
    return lambda: kernels_quant.run_quantized(algo.value, slots, p, g, blocks, coef)


def quantized_main(n: int, repeat: int, names: list[str], rate: float) -> None:
    print("| algorithm | moments | kernel Melem/s | bytes/elem | GB/s moved | % of floor "
          "| Melem/s vs float32 |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        fns = {state: quantized_kernel(name, state, n)
               for state in ("float32", "bfloat16", "int8")}
        t = best_of(fns, repeat)
        for state in fns:
            moved = quantized_bytes(name, state)
            elems = n / t[state]
            print(f"| {name} | {state} | {melem(elems)} | {moved:g} | "
                  f"{elems * moved / 1e9:.1f} | {100 * elems * moved / rate:.0f}% | "
                  f"{t['float32'] / t[state]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--muon-shape", default="1024x1024", help="Muon's matrix, ROWSxCOLS")
    ap.add_argument("--adafactor-rows", type=int, default=4096,
                    help="Adafactor's matrix: this many rows of --elements / rows columns")
    ap.add_argument("--sparse-shape", default="1000000x64", help="SparseAdam's embedding")
    ap.add_argument("--sparse-fraction", type=float, default=0.01,
                    help="SparseAdam: the fraction of the embedding's rows each step touches")
    ap.add_argument("--only-quantized", action="store_true",
                    help="the fused kernels over int8 and bfloat16 moments (with --only: of "
                         f"these algorithms, from {', '.join(QUANTIZED)})")
    args = ap.parse_args()
    n = args.elements
    muon_shape = tuple(int(d) for d in args.muon_shape.split("x"))
    sparse_shape = tuple(int(d) for d in args.sparse_shape.split("x"))
    names = args.only or list(BYTES)
    rate = copy_rate(n * 4, args.repeat)
    try:
        import torch

        tv = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        tv = "torch absent"
    print(f"# kernels: {n} fp32 elements, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, numba {numba.__version__} ({numba.config.NUMBA_NUM_THREADS} "
          f"threads), {tv}")
    print(f"memory copy rate (read+write): {rate / 1e9:.2f} GB/s\n")
    if args.only_quantized:
        quantized_main(n, args.repeat, args.only or list(QUANTIZED), rate)
        return
    print("| algorithm | adamserve step Melem/s | kernel only Melem/s | torch Melem/s (impl) "
          "| ratio step/torch | ratio kernel/torch | bytes/elem | step % of floor "
          "| kernel % of floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        shape = (muon_shape if name == "muon" else
                 (args.adafactor_rows, args.elements // args.adafactor_rows)
                 if name == "adafactor" else sparse_shape if name == "sparse_adam"
                 else (args.elements,))
        n = int(np.prod(shape))
        if name == "sparse_adam":  # elements: the touched rows'
            rows = sparse_rows(shape, args.sparse_fraction)
            n = len(rows) * int(np.prod(shape[1:]))
            fns = {"step": sparse_ours(shape, rows, check=True),
                   "kernel": sparse_ours(shape, rows, check=False)}
            torch_step, impl = sparse_theirs(shape, rows)
        else:
            fns = {"step": ours(name, shape, check=True),
                   "kernel": ours(name, shape, check=False)}
            torch_step, impl = theirs(name, shape)
        if torch_step is not None:
            fns["torch"] = torch_step
        t = best_of(fns, args.repeat)
        step, kernel = n / t["step"], n / t["kernel"]
        ref = n / t["torch"] if "torch" in t else float("nan")
        floor = rate / BYTES[name]  # elements/s if moving exactly BYTES at copy speed
        check_floor = rate / (BYTES[name] + 4)  # the non-finite check reads the gradient again
        label = (f"{name} ({args.sparse_shape}, {100 * args.sparse_fraction:g}% rows)"
                 if name == "sparse_adam" else name)
        print(f"| {label} | {melem(step)} | {melem(kernel)} | "
              f"{melem(ref)} ({impl}) | {step / ref:.2f} | {kernel / ref:.2f} | {BYTES[name]} "
              f"| {100 * step / check_floor:.0f}% | {100 * kernel / floor:.0f}% |")


if __name__ == "__main__":
    main()
