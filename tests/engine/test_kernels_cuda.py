"""The CUDA kernels against the CPU kernels: same optimizer, same gradients, same state.

Skipped (with the reason shown by ``pytest -ra``) where CuPy or a CUDA device is missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from adamserve.engine.backend import make_blocks
from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import ClipConfig, FlatOptimizer, Layout, TensorSpec

cupy = pytest.importorskip(
    "cupy", reason="CuPy is not installed: GPU kernel tests need CuPy and a CUDA device")

from adamserve.engine import kernels_cuda  # noqa: E402
from adamserve.engine.kernels_cuda import CudaBackend  # noqa: E402

if kernels_cuda.device_count() == 0:
    pytest.skip("CuPy found no CUDA device: GPU kernel tests need one", allow_module_level=True)

pytestmark = pytest.mark.gpu

Arr = npt.NDArray[Any]

TOL = {"float64": 1e-12, "float32": 1e-5}
STEPS = 30

# Tensors larger than one CUDA block (4096) and one CPU block (32768), a one-element
# tensor, an empty one, and tensors of two parameter groups interleaved.
LAYOUT = Layout((
    TensorSpec("w0", (100, 100), 0),
    TensorSpec("b0", (1,), 0),
    TensorSpec("w1", (37, 29), 1),
    TensorSpec("empty", (0, 4), 1),
    TensorSpec("w2", (5000, 9), 1),
    TensorSpec("s", (3,), 0),
))

# (algorithm, options for both groups, extra options for group 1 only)
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("adam", "adam", {}, {}),
    ("adam-amsgrad", "adam", {"amsgrad": True}, {}),
    ("adam-maximize-l2", "adam", {"maximize": True, "weight_decay": 0.1}, {}),
    ("adam-no-bias-correction", "adam", {"bias_correction": False}, {}),
    ("adam-amsgrad-group0-only", "adam", {"amsgrad": True}, {"amsgrad": False}),
    ("adamw", "adamw", {}, {}),
    ("adamw-amsgrad", "adamw", {"amsgrad": True}, {}),
    ("nadam", "nadam", {}, {}),
    ("nadam-decoupled", "nadam", {"decoupled_weight_decay": True, "weight_decay": 0.1}, {}),
    ("radam", "radam", {}, {}),
    ("radam-decoupled", "radam", {"decoupled_weight_decay": True, "weight_decay": 0.1}, {}),
    ("adamax-wd", "adamax", {"weight_decay": 0.1}, {}),
    ("adagrad-lr-decay-init", "adagrad",
     {"lr_decay": 0.01, "initial_accumulator_value": 0.1}, {}),
    ("rmsprop", "rmsprop", {}, {}),
    ("rmsprop-centered-momentum", "rmsprop", {"centered": True, "momentum": 0.9}, {}),
    ("rmsprop-mixed-groups", "rmsprop", {"centered": True},
     {"centered": False, "momentum": 0.5}),
    ("lamb", "lamb", {}, {}),
    ("lamb-wd", "lamb", {"weight_decay": 0.1}, {}),
    ("adamw-schedule-free", "adamw_schedule_free",
     {"train_mode": True, "warmup_steps": 5, "weight_decay": 0.1, "r": 0.5}, {}),
    ("radam-schedule-free", "radam_schedule_free", {"train_mode": True, "r": 1.0},
     {"silent_sgd_phase": False}),
    # factored statistics (w0, w1, w2, the empty matrix), variance (b0, s)
    ("adafactor", "adafactor", {}, {}),
    ("adafactor-wd-maximize-eps-d", "adafactor",
     {"weight_decay": 0.1, "maximize": True, "eps": (1e-30, 1e-3), "d": 2.0},
     {"beta2_decay": -0.5}),
]


def _rel(got: Any, ref: Any) -> float:
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    assert a.shape == b.shape
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _pair(algorithm: str, opts: dict[str, Any], group1: dict[str, Any], dtype: str,
          seed: int = 0, **kw: Any) -> tuple[FlatOptimizer, FlatOptimizer]:
    groups = [{**opts, "lr": 1e-2}, {**opts, **group1, "lr": 3e-3}]
    init = np.random.default_rng(seed).standard_normal(LAYOUT.size)
    init[LAYOUT.span(LAYOUT.index("b0"))] = 0.0  # a zero tensor: LAMB's trust ratio falls to 1
    gpu = FlatOptimizer(algorithm, LAYOUT, groups, backend=CudaBackend(), dtype=dtype,
                        params=init, **kw)
    cpu = FlatOptimizer(algorithm, LAYOUT, groups, backend=CpuBackend(), dtype=dtype,
                        params=init, **kw)
    return gpu, cpu


def _gradients(seed: int, steps: int) -> list[Arr]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(LAYOUT.size) * 0.5 + 0.1 for _ in range(steps)]


def _set_grad(opt: FlatOptimizer, g: Arr) -> None:
    opt.grad[...] = opt.backend.to_device(np.ascontiguousarray(g, dtype=opt.dtype))


def _state(opt: FlatOptimizer) -> dict[str, Arr]:
    out = {"param": opt.backend.to_host(opt.param), "grad": opt.backend.to_host(opt.grad)}
    for name in opt.slot_names():
        out[name] = opt.backend.to_host(opt.slots[name])
    return {k: np.array(v, copy=True) for k, v in out.items()}


def _assert_same(gpu: FlatOptimizer, cpu: FlatOptimizer, tol: float, when: str = "") -> None:
    assert gpu.slot_names() == cpu.slot_names()
    assert gpu.step_count == cpu.step_count
    np.testing.assert_array_equal(gpu.seg_step, cpu.seg_step)
    got, ref = _state(gpu), _state(cpu)
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == r.dtype, name
        err = _rel(g, r)
        assert err <= tol, f"{when}{name}: relative difference {err:.3g} > {tol:g}"


def _step_both(gpu: FlatOptimizer, cpu: FlatOptimizer, g: Arr,
               active: Arr | None = None) -> None:
    _set_grad(gpu, g)
    _set_grad(cpu, g)
    rg = gpu.step(active)
    rc = cpu.step(active)
    assert rg.skipped == rc.skipped
    assert rg.step == rc.step
    assert rg.nonfinite == rc.nonfinite
    if rc.grad_norm is None:
        assert rg.grad_norm is None
    else:
        assert rg.grad_norm is not None
        assert rg.grad_norm == pytest.approx(rc.grad_norm, rel=1e-12)


def test_device_is_visible() -> None:
    assert kernels_cuda.device_count() > 0
    name = kernels_cuda.device_name()
    assert isinstance(name, str) and name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("algorithm", "opts", "group1"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_cpu_kernels(algorithm: str, opts: dict[str, Any], group1: dict[str, Any],
                             dtype: str) -> None:
    gpu, cpu = _pair(algorithm, opts, group1, dtype)
    for i, g in enumerate(_gradients(1, STEPS)):
        _step_both(gpu, cpu, g)
        if i in (0, 5):
            _assert_same(gpu, cpu, TOL[dtype], when=f"step {i + 1}: ")
    _assert_same(gpu, cpu, TOL[dtype], when=f"after {STEPS} steps: ")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
@pytest.mark.parametrize("algorithm", ["adam", "lamb", "rmsprop", "adafactor"])
def test_clipping_matches_cpu(algorithm: str, per_tensor: bool, dtype: str) -> None:
    clip = ClipConfig(max_norm=0.1, per_tensor=per_tensor)
    gpu, cpu = _pair(algorithm, {}, {}, dtype, clip=clip)
    for g in _gradients(2, 10):
        _step_both(gpu, cpu, g)
    _assert_same(gpu, cpu, TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_gradient_skips_the_step(bad: float, dtype: str) -> None:
    gpu, cpu = _pair("adam", {"amsgrad": True}, {}, dtype)
    grads = _gradients(3, 4)
    for g in grads[:3]:
        _step_both(gpu, cpu, g)
    before = _state(gpu)
    poisoned = grads[3].copy()
    poisoned[LAYOUT.span(LAYOUT.index("w1")).start + 7] = bad
    _set_grad(gpu, poisoned)
    report = gpu.step()
    assert report.skipped
    assert report.nonfinite == ("w1",)
    assert report.step == 3 and gpu.step_count == 3
    after = _state(gpu)
    for name, b in before.items():
        if name == "grad":
            continue
        np.testing.assert_array_equal(after[name], b, err_msg=name)
    np.testing.assert_array_equal(gpu.seg_step, np.full(len(LAYOUT), 3))
    # The next finite step proceeds as if the bad one never happened.
    _step_both(gpu, cpu, grads[3])
    _assert_same(gpu, cpu, TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("algorithm", ["adam", "nadam", "lamb", "adafactor"])
def test_active_subsets_match_cpu(algorithm: str, dtype: str) -> None:
    gpu, cpu = _pair(algorithm, {}, {}, dtype)
    masks = [
        np.array([True, False, True, True, False, True]),
        np.array([False, True, False, False, True, False]),
        np.ones(len(LAYOUT), dtype=bool),
        np.array([False, False, False, True, False, False]),  # only the empty tensor
    ]
    for i, g in enumerate(_gradients(4, 12)):
        _step_both(gpu, cpu, g, masks[i % len(masks)])
    _assert_same(gpu, cpu, TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("algorithm", ["adamw_schedule_free", "radam_schedule_free"])
def test_schedule_free_swap_matches_cpu(algorithm: str, dtype: str) -> None:
    """eval() and train(): torch's lerp with the weights 1 - 1/b1 (-1 for group 0's
    beta1 = 0.5, its other form) and 1 - b1, on the tensors that have a z."""
    gpu, cpu = _pair(algorithm, {"train_mode": True, "betas": (0.5, 0.99)},
                     {"betas": (0.9, 0.999)}, dtype)
    masks = [np.array([True, False, True, True, True, False]), np.ones(len(LAYOUT), dtype=bool)]
    for i, g in enumerate(_gradients(7, 6)):
        _step_both(gpu, cpu, g, masks[int(i >= 3)])
    for train in (False, True):
        for opt in (gpu, cpu):
            for group in (0, 1):
                opt.set_hyperparameters(group, {"train_mode": train})
        _assert_same(gpu, cpu, TOL[dtype], when=f"train_mode {train}: ")
        assert gpu.groups == cpu.groups


# Muon's matrices (it takes no other shape): wide, tall, empty, over several blocks
MUON_LAYOUT = Layout((
    TensorSpec("w0", (100, 100), 0), TensorSpec("tall", (300, 20), 1),
    TensorSpec("empty", (0, 4), 1), TensorSpec("wide", (9, 5000), 0),
))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opts", [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw"}],
                         ids=["defaults", "plain-rms"])
def test_muon_matches_cpu(opts: dict[str, Any], dtype: str) -> None:
    """The momentum and apply kernels, and the Newton-Schulz iteration in cuBLAS GEMMs."""
    groups = [{**opts, "lr": 2e-2}, {**opts, "lr": 5e-3, "momentum": 0.9}]
    init = np.random.default_rng(5).standard_normal(MUON_LAYOUT.size)
    gpu, cpu = (FlatOptimizer("muon", MUON_LAYOUT, groups, backend=b, dtype=dtype, params=init)
                for b in (CudaBackend(), CpuBackend()))
    rng = np.random.default_rng(6)
    mask = np.array([True, False, True, True])
    for i in range(STEPS):
        _step_both(gpu, cpu, rng.standard_normal(MUON_LAYOUT.size), None if i % 3 else mask)
    _assert_same(gpu, cpu, TOL[dtype], when=f"after {STEPS} steps: ")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_sumsq(dtype: type) -> None:
    backend = CudaBackend()
    offsets = LAYOUT.offsets
    nseg = len(LAYOUT)
    x = np.random.default_rng(5).standard_normal(LAYOUT.size).astype(dtype)
    blocks = make_blocks(backend, offsets)
    got = backend.segment_sumsq(backend.to_device(x), blocks, nseg)
    assert got.dtype == np.float64 and got.shape == (nseg,)
    ref = np.array([np.sum(x[offsets[i]:offsets[i + 1]].astype(np.float64) ** 2)
                    for i in range(nseg)])
    assert _rel(got, ref) <= 1e-13
    assert got[LAYOUT.index("empty")] == 0.0
    x[LAYOUT.span(LAYOUT.index("w2")).start + 4100] = np.nan
    x[LAYOUT.span(LAYOUT.index("s")).start] = np.inf
    got = backend.segment_sumsq(backend.to_device(x), blocks, nseg)
    finite = np.isfinite(got)
    assert np.isnan(got[LAYOUT.index("w2")])
    assert got[LAYOUT.index("s")] == np.inf
    assert finite.sum() == nseg - 2


def test_absent_slots_are_never_touched() -> None:
    """amsgrad off / plain rmsprop: the kernels get no buffer for those slots."""
    cases: tuple[tuple[str, dict[str, Any]], ...] = (("adam", {}), ("rmsprop", {}))
    for algorithm, opts in cases:
        gpu, cpu = _pair(algorithm, opts, {}, "float64")
        assert "max_exp_avg_sq" not in gpu.slots and "momentum_buffer" not in gpu.slots
        for g in _gradients(6, 3):
            _step_both(gpu, cpu, g)
        _assert_same(gpu, cpu, TOL["float64"])
