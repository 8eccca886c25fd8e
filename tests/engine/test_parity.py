"""The Adam family against torch.optim: one table of cases, one parametrized test.

Each case runs torch's optimizer and adamserve's fused kernel side by side for 50+
steps on fresh random gradients over several shapes, in float64 (1e-12 relative)
and float32 (1e-5), with one parameter group or two that differ in hyperparameters.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import schedulefree
import torch

from adamserve.engine.optimizer import ClipConfig, FlatOptimizer, Layout, TensorSpec

SHAPES = [(7, 5), (33,), (2, 3, 4), (1,), (40000,)]  # the last spans several kernel blocks
STEPS = 50
TOL = {"float64": 1e-12, "float32": 1e-5}


@dataclass(frozen=True)
class Case:
    algorithm: str
    torch_cls: Callable[..., torch.optim.Optimizer]
    options: dict[str, Any] = field(default_factory=dict)
    # overrides for the second parameter group in the two-group layout
    group2: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.algorithm}[{opts}]"


CASES = [
    Case("adam", torch.optim.Adam, {}, {"lr": 5e-4}),
    Case("adam", torch.optim.Adam, {"amsgrad": True}, {"lr": 2e-3, "betas": (0.8, 0.99)}),
    Case("adam", torch.optim.Adam, {"weight_decay": 0.1, "maximize": True}, {"weight_decay": 0.0}),
    Case("adam", torch.optim.Adam, {"weight_decay": 0.1, "decoupled_weight_decay": True},
         {"amsgrad": True}),
    Case("adam", torch.optim.Adam, {"betas": (0.3, 0.9), "eps": 1e-6}, {"lr": 1e-2}),
    Case("adamw", torch.optim.AdamW, {}, {"weight_decay": 0.3}),
    Case("adamw", torch.optim.AdamW, {"amsgrad": True, "weight_decay": 0.05}, {"lr": 3e-3}),
    Case("adamw", torch.optim.AdamW, {"maximize": True, "lr": 1e-2}, {"maximize": False}),
    Case("nadam", torch.optim.NAdam, {}, {"lr": 1e-3}),
    Case("nadam", torch.optim.NAdam, {"weight_decay": 0.1}, {"momentum_decay": 1e-2}),
    Case("nadam", torch.optim.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True},
         {"weight_decay": 0.01}),
    Case("nadam", torch.optim.NAdam, {"maximize": True, "betas": (0.95, 0.99)}, {}),
    Case("radam", torch.optim.RAdam, {}, {"lr": 3e-3}),
    Case("radam", torch.optim.RAdam, {"weight_decay": 0.1, "betas": (0.9, 0.99)},
         {"betas": (0.9, 0.9)}),
    Case("radam", torch.optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True,
                                      "maximize": True}, {}),
    Case("adamax", torch.optim.Adamax, {}, {"lr": 1e-3}),
    Case("adamax", torch.optim.Adamax, {"weight_decay": 0.1, "maximize": True},
         {"betas": (0.5, 0.9)}),
    Case("adagrad", torch.optim.Adagrad, {}, {"lr": 0.1}),
    Case("adagrad", torch.optim.Adagrad, {"lr_decay": 0.01, "initial_accumulator_value": 0.1,
                                          "weight_decay": 0.1, "maximize": True},
         {"eps": 1e-6}),
    Case("rmsprop", torch.optim.RMSprop, {}, {"alpha": 0.9}),
    Case("rmsprop", torch.optim.RMSprop, {"centered": True}, {"lr": 1e-3}),
    Case("rmsprop", torch.optim.RMSprop, {"momentum": 0.9}, {"momentum": 0.5}),
    Case("rmsprop", torch.optim.RMSprop, {"centered": True, "momentum": 0.9,
                                          "weight_decay": 0.1, "maximize": True},
         {"centered": False}),
    # schedulefree's (its foreach path, the default, and its per-tensor loop)
    Case("adamw_schedule_free", schedulefree.AdamWScheduleFree, {}, {"lr": 1e-2}),
    Case("adamw_schedule_free", schedulefree.AdamWScheduleFree,
         {"lr": 1e-2, "warmup_steps": 10, "weight_decay": 0.1, "r": 0.5},
         {"betas": (0.5, 0.99), "weight_lr_power": 0.0}),
    Case("adamw_schedule_free", schedulefree.AdamWScheduleFree,
         {"foreach": False, "warmup_steps": 3, "eps": 1e-6}, {"weight_decay": 0.05}),
    Case("radam_schedule_free", schedulefree.RAdamScheduleFree, {}, {"lr": 1e-2}),
    Case("radam_schedule_free", schedulefree.RAdamScheduleFree,
         {"lr": 1e-2, "weight_decay": 0.1, "r": 1.0, "betas": (0.9, 0.99)},
         {"silent_sgd_phase": False}),
    Case("radam_schedule_free", schedulefree.RAdamScheduleFree,
         {"foreach": False, "silent_sgd_phase": False}, {"weight_decay": 0.01}),
    # factored statistics for the 2-D and 3-D tensors, variance for the others
    Case("adafactor", torch.optim.Adafactor, {}, {"lr": 3e-3}),
    Case("adafactor", torch.optim.Adafactor,
         {"weight_decay": 0.1, "maximize": True, "eps": (1e-30, 1e-3), "d": 2.0},
         {"beta2_decay": -0.5}),
    Case("adafactor", torch.optim.Adafactor, {"foreach": True, "lr": 0.05, "eps": (None, 1e-2)},
         {"weight_decay": 0.05}),
]


def _grads(rng: np.random.Generator, dtype: str) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _layout(two_groups: bool) -> Layout:
    return Layout(tuple(TensorSpec(f"t{i}", s, group=(i % 2 if two_groups else 0))
                        for i, s in enumerate(SHAPES)))


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays])


def _compare(ours: np.ndarray, ref: np.ndarray, tol: float, what: str) -> None:
    scale = float(np.max(np.abs(ref))) or 1.0
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("two_groups", [False, True], ids=["1group", "2groups"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch(case: Case, two_groups: bool, dtype: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{case.id}/{two_groups}/{dtype}".encode()))
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)  # torch's step / mu_product scalars follow it
    try:
        p0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        tparams = [torch.tensor(p, requires_grad=True) for p in p0]
        layout = _layout(two_groups)
        # schedulefree's optimizers start in eval mode; foreach picks its implementation
        mode = {"train_mode": True} if hasattr(case.torch_cls, "train") else {}
        if two_groups:
            groups = [dict(case.options), {**case.options, **case.group2}]
            # options also as constructor defaults: torch's Adagrad reads
            # initial_accumulator_value from the constructor, not from the group
            topt = case.torch_cls([
                {"params": tparams[0::2], **groups[0]},
                {"params": tparams[1::2], **groups[1]},
            ], **case.options)
        else:
            groups = [dict(case.options)]
            topt = case.torch_cls(tparams, **case.options)
        if mode:
            topt.train()
        ours = FlatOptimizer(case.algorithm, layout,
                             [{k: v for k, v in {**g, **mode}.items() if k != "foreach"}
                              for g in groups], dtype=dtype, params=_flat(p0))
        for _ in range(STEPS):
            grads = _grads(rng, dtype)
            for t, g in zip(tparams, grads, strict=True):
                t.grad = torch.tensor(g)
            topt.step()
            ours.grad[:] = _flat(grads)
            report = ours.step()
            assert not report.skipped
    finally:
        torch.set_default_dtype(previous)
    ref = _flat([t.detach().numpy() for t in tparams])
    _compare(ours.param, ref, TOL[dtype], "params")
    # every moment buffer as well, through the torch-named slots
    for i, t in enumerate(tparams):
        st = topt.state[t]
        for slot in ours.group_slots(layout.tensors[i].group):
            if ours.slot_shape(slot, i) is None:  # Adafactor's: by the tensor's dims
                assert slot not in st
                continue
            _compare(ours.slot_tensor(slot, i), st[slot].numpy(), TOL[dtype], f"{slot} of t{i}")
        if not mode:
            assert ours.seg_step[i] == int(st["step"])
    if mode:  # schedulefree counts steps per group, beside its other per-group state
        for h, theirs in zip(ours.groups, topt.param_groups, strict=True):
            assert h["k"] == theirs["k"] == STEPS
            for key in ("weight_sum", "lr_max", "scheduled_lr"):
                assert h[key] == pytest.approx(theirs[key], rel=1e-15), key


def test_global_clipping_matches_clip_grad_norm() -> None:
    rng = np.random.default_rng(1)
    torch.set_default_dtype(torch.float64)
    try:
        p0 = [rng.standard_normal(s) for s in SHAPES]
        tparams = [torch.tensor(p, requires_grad=True) for p in p0]
        topt = torch.optim.AdamW(tparams, lr=1e-2)
        ours = FlatOptimizer("adamw", _layout(False), [{"lr": 1e-2}], dtype="float64",
                             params=_flat(p0), clip=ClipConfig(max_norm=1.0))
        for _ in range(20):
            grads = _grads(rng, "float64")
            for t, g in zip(tparams, grads, strict=True):
                t.grad = torch.tensor(g)
            norm = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
            topt.step()
            ours.grad[:] = _flat(grads)
            report = ours.step()
            assert report.grad_norm == pytest.approx(float(norm), rel=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)
    _compare(ours.param, _flat([t.detach().numpy() for t in tparams]), 1e-12, "params")


def test_per_tensor_clipping() -> None:
    rng = np.random.default_rng(2)
    layout = _layout(False)
    ours = FlatOptimizer("adam", layout, dtype="float64", params=np.zeros(layout.size),
                         clip=ClipConfig(max_norm=0.5, per_tensor=True))
    plain = FlatOptimizer("adam", layout, dtype="float64", params=np.zeros(layout.size))
    grads = _grads(rng, "float64")
    clipped = [g * min(1.0, 0.5 / (np.linalg.norm(g) + 1e-6)) for g in grads]
    ours.grad[:] = _flat(grads)
    plain.grad[:] = _flat(clipped)
    ours.step()
    plain.step()
    _compare(ours.slots["exp_avg"], plain.slots["exp_avg"], 1e-14, "exp_avg")


# ---------------------------------------------------------------------------
# LAMB: torch has none; the oracle is a float64 NumPy transcription of optax.lamb.
# ---------------------------------------------------------------------------


def _lamb_reference(params: list[np.ndarray], grads_seq: list[list[np.ndarray]], lr: float,
                    b1: float, b2: float, eps: float, wd: float) -> list[np.ndarray]:
    p = [x.copy() for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_seq, start=1):
        for i, g in enumerate(grads):
            m[i] = (1 - b1) * g + b1 * m[i]
            v[i] = (1 - b2) * g * g + b2 * v[i]
            mh = m[i] / (1 - b1**t)
            vh = v[i] / (1 - b2**t)
            r = mh / (np.sqrt(vh) + eps) + wd * p[i]
            pn, rn = np.linalg.norm(p[i]), np.linalg.norm(r)
            ratio = 1.0 if pn == 0 or rn == 0 else pn / rn
            p[i] = p[i] - lr * ratio * r
    return p


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_matches_reference(dtype: str, wd: float) -> None:
    rng = np.random.default_rng(3)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    p0[3][:] = 0.0  # a zero tensor: trust ratio falls back to 1
    seq = [_grads(rng, "float64") for _ in range(STEPS)]
    ref = _lamb_reference(p0, seq, 1e-2, 0.9, 0.999, 1e-6, wd)
    ours = FlatOptimizer("lamb", _layout(False), [{"lr": 1e-2, "weight_decay": wd}], dtype=dtype,
                         params=_flat(p0))
    for grads in seq:
        ours.grad[:] = _flat(grads)
        ours.step()
    _compare(ours.param, _flat(ref), TOL[dtype], "lamb params")


# ---------------------------------------------------------------------------
# The worked example from the Adam notes, bias correction, the step counter.
# ---------------------------------------------------------------------------


def test_worked_example_without_bias_correction() -> None:
    lay = Layout((TensorSpec("w", (1,)),))
    opt = FlatOptimizer("adam", lay, [{"lr": 0.001, "bias_correction": False}],
                        dtype="float64", params=np.array([0.5]))
    opt.grad[:] = 0.2
    opt.step()
    assert opt.slots["exp_avg"][0] == pytest.approx(0.02, rel=1e-12)
    assert opt.slots["exp_avg_sq"][0] == pytest.approx(0.00004, rel=1e-12)
    assert round(float(opt.param[0]), 5) == 0.49684
    assert opt.param[0] == pytest.approx(0.5 - 0.001 * 0.02 / (np.sqrt(0.00004) + 1e-8), rel=1e-15)


@pytest.mark.parametrize("g", [0.2, -3.0, 1e-3])
def test_first_bias_corrected_step_is_lr_times_sign(g: float) -> None:
    lay = Layout((TensorSpec("w", (1,)),))
    opt = FlatOptimizer("adam", lay, [{"lr": 0.001}], dtype="float64", params=np.array([0.5]))
    opt.grad[:] = g
    opt.step()
    assert opt.param[0] == pytest.approx(0.5 - 0.001 * np.sign(g), rel=1e-7)


def test_step_counter_is_exact_past_float32_range() -> None:
    """torch's float32 step would round 2**24 + 1 to 2**24; ours is an integer."""
    lay = Layout((TensorSpec("w", (3,)),))
    opt = FlatOptimizer("adam", lay, [{"betas": (0.9, 0.999999999)}], dtype="float64")
    opt.seg_step[:] = 2**24
    opt.grad[:] = 1.0
    opt.step()
    assert int(opt.seg_step[0]) == 2**24 + 1
    assert float(np.float32(2**24 + 1)) == 2**24  # what a float32 counter would hold


def test_nonfinite_gradient_skips_the_step_and_changes_nothing() -> None:
    rng = np.random.default_rng(4)
    layout = _layout(False)
    opt = FlatOptimizer("adam", layout, params=rng.standard_normal(layout.size))
    opt.grad[:] = rng.standard_normal(layout.size)
    opt.step()
    before = (opt.param.copy(), opt.slots["exp_avg"].copy(), opt.seg_step.copy(), opt.step_count)
    opt.grad[:] = 1.0
    opt.grad[layout.span(2)][3] = np.nan
    opt.grad[layout.span(4)][0] = np.inf
    report = opt.step()
    assert report.skipped and report.nonfinite == ("t2", "t4")
    np.testing.assert_array_equal(opt.param, before[0])
    np.testing.assert_array_equal(opt.slots["exp_avg"], before[1])
    np.testing.assert_array_equal(opt.seg_step, before[2])
    assert opt.step_count == before[3]


def test_partial_step_leaves_unsent_tensors_alone() -> None:
    """Like torch skipping parameters whose grad is None."""
    rng = np.random.default_rng(5)
    layout = _layout(False)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    tparams = [torch.tensor(p, requires_grad=True) for p in p0]
    topt = torch.optim.Adam(tparams, lr=1e-2)
    ours = FlatOptimizer("adam", layout, [{"lr": 1e-2}], dtype="float64", params=_flat(p0))
    for k in range(10):
        active = np.array([(i + k) % 3 != 0 for i in range(len(SHAPES))])
        grads = _grads(rng, "float64")
        for i, t in enumerate(tparams):
            t.grad = torch.tensor(grads[i]) if active[i] else None
        topt.step()
        ours.grad[:] = _flat(grads)
        ours.step(active)
    _compare(ours.param, _flat([t.detach().numpy() for t in tparams]), 1e-12, "params")


def test_concurrent_steps_from_threads() -> None:
    """Sessions step in parallel: the kernels' threading layer must allow it."""
    rng = np.random.default_rng(6)
    layout = _layout(False)
    grads = [rng.standard_normal(layout.size).astype(np.float32) for _ in range(10)]
    solo = FlatOptimizer("adamw", layout)
    for g in grads:
        solo.grad[:] = g
        solo.step()
    opts = [FlatOptimizer("adamw", layout) for _ in range(4)]
    errors: list[BaseException] = []

    def run(opt: FlatOptimizer) -> None:
        try:
            for g in grads:
                opt.grad[:] = g
                opt.step()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(o,)) for o in opts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for o in opts:
        np.testing.assert_array_equal(o.param, solo.param)


def test_hyperparameter_change_takes_effect_next_step() -> None:
    rng = np.random.default_rng(7)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    tparams = [torch.tensor(p, requires_grad=True) for p in p0]
    topt = torch.optim.RMSprop(tparams, lr=1e-2)
    ours = FlatOptimizer("rmsprop", _layout(False), [{"lr": 1e-2}], dtype="float64",
                         params=_flat(p0))
    for k in range(12):
        if k == 6:
            topt.param_groups[0].update(lr=5e-3, alpha=0.9, weight_decay=0.1)
            ours.set_hyperparameters(0, {"lr": 5e-3, "alpha": 0.9, "weight_decay": 0.1})
        grads = _grads(rng, "float64")
        for t, g in zip(tparams, grads, strict=True):
            t.grad = torch.tensor(g)
        topt.step()
        ours.grad[:] = _flat(grads)
        ours.step()
    _compare(ours.param, _flat([t.detach().numpy() for t in tparams]), 1e-12, "params")


def test_switching_momentum_on_allocates_its_buffer() -> None:
    # torch.optim.RMSprop raises KeyError here; we allocate the zeroed buffer it implies
    ours = FlatOptimizer("rmsprop", _layout(False), dtype="float64")
    ours.grad[:] = 1.0
    ours.step()
    ours.set_hyperparameters(0, {"momentum": 0.9})
    assert "momentum_buffer" in ours.slots
    ours.step()
    assert np.all(ours.slots["momentum_buffer"] != 0)


def test_bad_hyperparameters_are_named() -> None:
    lay = _layout(False)
    with pytest.raises(ValueError, match="beta2: expected a value in \\[0, 1\\)"):
        FlatOptimizer("adam", lay, [{"betas": (0.9, 1.0)}])
    with pytest.raises(ValueError, match="unknown hyperparameter 'momentum' for adam"):
        FlatOptimizer("adam", lay, [{"momentum": 0.9}])
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        FlatOptimizer("sgd", lay)
    with pytest.raises(ValueError, match="lr: expected a value >= 0"):
        FlatOptimizer("adamw", lay, [{"lr": -1.0}])


@pytest.mark.parametrize("algorithm,cls", [("adamw", torch.optim.AdamW),
                                           ("nadam", torch.optim.NAdam),
                                           ("adagrad", torch.optim.Adagrad)])
def test_add_tensors_mid_run_matches_add_param_group(algorithm: str, cls: Any) -> None:
    rng = np.random.default_rng(8)
    torch.set_default_dtype(torch.float64)
    try:
        first = [rng.standard_normal(s) for s in SHAPES[:3]]
        later = [rng.standard_normal(s) for s in SHAPES[3:]]
        tparams = [torch.tensor(p, requires_grad=True) for p in first]
        extra = [torch.tensor(p, requires_grad=True) for p in later]
        opts = {"initial_accumulator_value": 0.1} if algorithm == "adagrad" else {}
        topt = cls(tparams, lr=1e-2, **opts)
        layout = Layout(tuple(TensorSpec(f"t{i}", s) for i, s in enumerate(SHAPES[:3])))
        ours = FlatOptimizer(algorithm, layout, [{"lr": 1e-2, **opts}], dtype="float64",
                             params=_flat(first))
        for k in range(12):
            if k == 5:
                topt.add_param_group({"params": extra, "lr": 3e-2})
                ours.add_tensors([TensorSpec(f"t{3 + i}", s, group=1)
                                  for i, s in enumerate(SHAPES[3:])], _flat(later),
                                 group={"lr": 3e-2, **opts})
            live = tparams + (extra if k >= 5 else [])
            grads = [rng.standard_normal(tuple(t.shape)) for t in live]
            for t, g in zip(live, grads, strict=True):
                t.grad = torch.tensor(g)
            topt.step()
            ours.grad[:] = _flat(grads)
            ours.step()
    finally:
        torch.set_default_dtype(torch.float32)
    _compare(ours.param, _flat([t.detach().numpy() for t in tparams + extra]), 1e-12, "params")
    assert list(ours.seg_step) == [12, 12, 12, 7, 7]
