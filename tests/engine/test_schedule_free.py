"""The schedule-free pair against facebookresearch's schedulefree (1.4.1), in the engine.

test_parity.py's table runs plain training; here what only schedule-free has: the
train()/eval() swap in the middle of a run (with a weight below -0.5, where torch's
lerp takes its other form), tensors without a gradient (z starts at a tensor's first
step; every group steps), a group added mid-run (it starts in eval mode, as the
package's does), the state_dict in the package's format both ways, a step applied
as gradients arrive, and the refusals: a step in eval mode, state that only a
state_dict sets, eval with beta1 = 0, an overflowing averaging weight.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest
import schedulefree
import torch

from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec
from adamserve.engine.statedict import export_state, import_state
from adamserve.errors import FailedPrecondition

SHAPES = [(7, 5), (33,), (2, 3, 4), (1,), (40000,)]
STEPS = 30
TOL = {"float64": 1e-12, "float32": 1e-5}
ORACLE = {"adamw_schedule_free": schedulefree.AdamWScheduleFree,
          "radam_schedule_free": schedulefree.RAdamScheduleFree}
# (algorithm, both groups, group 1 only): weight decay, r > 0, warmup, beta1 = 0.5 (the
# eval weight 1 - 1/beta1 = -1), RAdam with and without its silent phase
CASES = [
    ("adamw_schedule_free", {"lr": 1e-2, "warmup_steps": 5, "weight_decay": 0.1, "r": 0.5},
     {"lr": 3e-3, "betas": (0.5, 0.99)}),
    ("radam_schedule_free", {"lr": 1e-2, "weight_decay": 0.1, "r": 1.0},
     {"silent_sgd_phase": False, "betas": (0.5, 0.9)}),
]


def _flat(arrays: list[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def _compare(ours: Any, ref: Any, tol: float, what: str) -> None:
    ref = np.asarray(ref)
    scale = float(np.max(np.abs(ref))) or 1.0
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=tol, atol=tol * scale, err_msg=what)


class Pair:
    """The package's optimizer and ours on the same parameters (two groups: the first three
    tensors and the last two, the session's order as the client makes it), stepped on the
    same gradients."""

    def __init__(self, algorithm: str, options: dict[str, Any], group2: dict[str, Any],
                 dtype: str, seed: int = 0) -> None:
        self.dtype = dtype
        self.rng = np.random.default_rng(seed)
        p0 = [self.rng.standard_normal(s).astype(dtype) for s in SHAPES]
        self.tparams = [torch.tensor(p) for p in p0]
        groups = [dict(options), {**options, **group2}]
        self.topt = ORACLE[algorithm]([{"params": self.tparams[:3], **groups[0]},
                                       {"params": self.tparams[3:], **groups[1]}])
        layout = Layout(tuple(TensorSpec(f"t{i}", s, group=int(i >= 3))
                              for i, s in enumerate(SHAPES)))
        self.ours = FlatOptimizer(algorithm, layout, groups, dtype=dtype, params=_flat(p0))

    def step(self, skip: tuple[int, ...] = ()) -> None:
        grads = [self.rng.standard_normal(t.shape).astype(self.dtype) for t in self.tparams]
        for i, (t, g) in enumerate(zip(self.tparams, grads, strict=True)):
            t.grad = None if i in skip else torch.tensor(g)
        self.topt.step()
        self.ours.grad[:] = _flat(grads)
        self.ours.step(np.array([i not in skip for i in range(len(self.tparams))]))

    def mode(self, train: bool) -> None:
        (self.topt.train if train else self.topt.eval)()
        for g in range(len(self.ours.groups)):
            self.ours.set_hyperparameters(g, {"train_mode": train})

    def check(self, what: str) -> None:
        tol = TOL[self.dtype]
        _compare(self.ours.param, _flat([t.numpy() for t in self.tparams]), tol,
                 f"params {what}")
        for i, t in enumerate(self.tparams):
            st = self.topt.state[t]
            assert ("z" in st) == (self.ours.seg_step[i] > 0), f"t{i} has a z {what}"
            for slot in st:
                _compare(self.ours.tensor(self.ours.slots[slot], i), st[slot].numpy(), tol,
                         f"{slot} of t{i} {what}")
        for h, theirs in zip(self.ours.groups, self.topt.param_groups, strict=True):
            assert h["k"] == theirs["k"] and h["train_mode"] == theirs["train_mode"], what
            for key in ("weight_sum", "lr_max", "scheduled_lr"):
                assert h[key] == pytest.approx(theirs[key], rel=1e-15), f"{key} {what}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("algorithm", "options", "group2"), CASES, ids=[c[0] for c in CASES])
def test_eval_and_train_in_the_middle(algorithm: str, options: dict[str, Any],
                                      group2: dict[str, Any], dtype: str) -> None:
    pair = Pair(algorithm, options, group2, dtype,
                seed=zlib.crc32(f"{algorithm}/{dtype}".encode()))
    pair.mode(True)
    for k in range(STEPS):
        # t4 gets no gradient until step 8 (its z starts then), t2 every other step
        pair.step(skip=(2,) * (k % 2) + (4,) * (k < 8))
        if k == 14:
            pair.check("before eval()")
            pair.mode(False)  # x: the average, what one evaluates
            pair.check("in eval mode")
            pair.mode(False)  # again: nothing moves
            pair.check("after a second eval()")
            pair.mode(True)
            pair.check("back in train mode")
    pair.check(f"after {STEPS} steps")
    pair.mode(False)
    pair.check("in eval mode at the end")


def test_a_group_added_mid_run_starts_in_eval_mode_as_the_packages() -> None:
    pair = Pair("adamw_schedule_free", {"lr": 1e-2, "warmup_steps": 4}, {}, "float64")
    pair.mode(True)
    for _ in range(5):
        pair.step()
    extra = pair.rng.standard_normal((6, 3))
    added = torch.tensor(extra)
    pair.topt.add_param_group({"params": [added], "lr": 2e-2})
    pair.tparams.append(added)
    pair.ours.add_tensors([TensorSpec("t5", (6, 3), group=2)], extra.ravel(),
                          group={"lr": 2e-2})
    assert pair.ours.groups[2]["train_mode"] is False and pair.ours.groups[2]["k"] == 0
    for _ in range(6):  # group 0 is in train mode, so the steps go on; the new group steps
        pair.step()
    pair.check("with the new group")
    pair.mode(False)
    pair.check("after eval()")
    pair.mode(True)  # now the new group swaps too
    pair.check("after train()")


@pytest.mark.parametrize(("algorithm", "options", "group2"), CASES, ids=[c[0] for c in CASES])
def test_state_dict_both_ways_with_the_package(algorithm: str, options: dict[str, Any],
                                               group2: dict[str, Any]) -> None:
    pair = Pair(algorithm, options, group2, "float64", seed=11)
    pair.mode(True)
    for k in range(12):
        pair.step(skip=(3,) if k < 6 else ())
    ours = export_state(pair.ours)
    theirs = pair.topt.state_dict()
    assert set(ours["state"]) == set(theirs["state"]) == set(range(len(SHAPES)))
    for i, entry in theirs["state"].items():
        assert set(ours["state"][i]) == set(entry) == {"z", "exp_avg_sq"}
    for mine, other in zip(ours["param_groups"], theirs["param_groups"], strict=True):
        other = {k: v for k, v in other.items() if k != "foreach"}  # a switch: the client's
        assert set(mine) == set(other) | {"param_names"}
        for key in ("k", "warmup_steps"):
            if key in other:
                assert type(mine[key]) is int and mine[key] == other[key], key
        assert mine["train_mode"] is True and mine["betas"] == other["betas"]

    # ours -> the package: a fresh one loads our export and trains on as ours does
    fresh = [t.clone() for t in pair.tparams]
    loaded = ORACLE[algorithm]([{"params": fresh[:3]}, {"params": fresh[3:]}])
    loaded.load_state_dict({
        "state": {i: {k: torch.tensor(v) for k, v in e.items()} for i, e in ours["state"].items()},
        "param_groups": [{**g, "foreach": True} for g in ours["param_groups"]]})
    # the package -> ours: a fresh session imports the package's state_dict
    twin = FlatOptimizer(algorithm, pair.ours.layout, [{}, {}], dtype="float64",
                         params=_flat([t.numpy() for t in pair.tparams]))
    import_state(twin, {"state": {i: {k: v.numpy() for k, v in e.items()}
                                  for i, e in theirs["state"].items()},
                        "param_groups": theirs["param_groups"]})
    assert twin.groups == pair.ours.groups
    for _ in range(10):
        grads = [pair.rng.standard_normal(t.shape) for t in pair.tparams]
        for opt in (pair.ours, twin):
            opt.grad[:] = _flat(grads)
            opt.step()
        for t, g in zip(fresh, grads, strict=True):
            t.grad = torch.tensor(g)
        loaded.step()
    for opt in (twin, pair.ours):
        _compare(opt.param, _flat([t.numpy() for t in fresh]), 1e-12, "params")
    loaded.eval()
    for opt in (twin, pair.ours):
        opt.set_hyperparameters(0, {"train_mode": False})
        opt.set_hyperparameters(1, {"train_mode": False})
        _compare(opt.param, _flat([t.numpy() for t in fresh]), 1e-12, "params after eval")


def test_import_sets_the_mode_without_moving_the_parameters() -> None:
    pair = Pair("adamw_schedule_free", {"lr": 1e-2}, {}, "float64")
    pair.mode(True)
    for _ in range(4):
        pair.step()
    sd = export_state(pair.ours)
    before = pair.ours.param.copy()
    import_state(pair.ours, {**sd, "param_groups": [{**g, "train_mode": False}
                                                     for g in sd["param_groups"]]})
    np.testing.assert_array_equal(pair.ours.param, before)
    assert [h["train_mode"] for h in pair.ours.groups] == [False, False]
    assert pair.ours.step_count == 4


def test_a_step_applied_as_gradients_arrive_equals_a_step() -> None:
    layout = Layout(tuple(TensorSpec(f"t{i}", s) for i, s in enumerate(SHAPES)))
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(layout.size)
    kw: dict[str, Any] = {"dtype": "float64", "params": p0, "skip_nonfinite": False}
    whole = FlatOptimizer("radam_schedule_free", layout, [{"train_mode": True, "r": 0.5}], **kw)
    streamed = FlatOptimizer("radam_schedule_free", layout, [{"train_mode": True, "r": 0.5}],
                             **kw)
    assert streamed.streamable
    for _ in range(8):
        g = rng.standard_normal(layout.size)
        whole.grad[:] = g
        whole.step()
        streamed.grad[:] = g
        stream = streamed.begin_stream()
        for i in range(len(layout)):
            span = layout.span(i)
            mid = (span.start + span.stop) // 2
            stream.apply(i, span.start, mid)
            stream.apply(i, mid, span.stop)
        stream.finish()
    np.testing.assert_array_equal(streamed.param, whole.param)
    np.testing.assert_array_equal(streamed.slots["z"], whole.slots["z"])
    assert streamed.groups == whole.groups


def _snapshot(opt: FlatOptimizer) -> tuple[Any, ...]:
    return (opt.param.copy(), {k: v.copy() for k, v in opt.slots.items()}, opt.seg_step.copy(),
            opt.step_count, [dict(h) for h in opt.groups])


def _unchanged(opt: FlatOptimizer, before: tuple[Any, ...]) -> None:
    after = _snapshot(opt)
    np.testing.assert_array_equal(after[0], before[0])
    for k in before[1]:
        np.testing.assert_array_equal(after[1][k], before[1][k])
    np.testing.assert_array_equal(after[2], before[2])
    assert after[3:] == before[3:]


def _stepped(algorithm: str = "adamw_schedule_free", **group: Any) -> FlatOptimizer:
    layout = Layout((TensorSpec("w", (4, 3)), TensorSpec("b", (3,))))
    opt = FlatOptimizer(algorithm, layout, [{"train_mode": True, **group}], dtype="float64",
                        params=np.linspace(-1, 1, layout.size))
    opt.grad[:] = np.linspace(0.5, -0.5, layout.size)
    opt.step()
    return opt


def test_a_step_in_eval_mode_is_refused_and_changes_nothing() -> None:
    opt = _stepped()
    opt.set_hyperparameters(0, {"train_mode": False})
    before = _snapshot(opt)
    with pytest.raises(FailedPrecondition, match=r"not in train mode.*group 0 has train_mode false"):
        opt.step()
    opt.skip_nonfinite = False
    with pytest.raises(FailedPrecondition, match="not in train mode"):
        opt.begin_stream()
    _unchanged(opt, before)
    with pytest.raises(FailedPrecondition, match="not in train mode"):  # from the start too
        FlatOptimizer("radam_schedule_free", Layout((TensorSpec("w", (2,)),))).step()


@pytest.mark.parametrize(("changes", "message"), [
    ({"k": 3}, "k: the per-group state of adamw_schedule_free, kept by its steps"),
    ({"weight_sum": 1.0, "lr_max": 0.1}, "lr_max, weight_sum: the per-group state"),
    ({"train_mode": 1}, "train_mode: expected true or false, got 1"),
    ({"warmup_steps": -5}, "warmup_steps: expected a whole number >= 0, got -5.0"),
    ({"warmup_steps": 2.5}, "warmup_steps: expected a whole number, got 2.5"),
    ({"r": -1.0}, "r: expected a value >= 0"),
    ({"silent_sgd_phase": False}, "unknown hyperparameter 'silent_sgd_phase'"),
])
def test_bad_changes_are_named_and_change_nothing(changes: dict[str, Any], message: str) -> None:
    opt = _stepped(warmup_steps=3)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.slots_after(0, changes)
    with pytest.raises(ValueError, match=message):
        opt.set_hyperparameters(0, changes)
    _unchanged(opt, before)


@pytest.mark.parametrize(("group", "message"), [
    ({"warmup_steps": -1}, "warmup_steps: expected a whole number >= 0"),
    ({"k": 2.5}, "k: expected a whole number, got 2.5"),
    ({"lr_max": -2.0}, r"lr_max: expected a value in \[-1, inf\]"),
    ({"weight_sum": float("nan")}, "weight_sum: expected a finite number"),
])
def test_bad_groups_are_refused_at_creation(group: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlatOptimizer("adamw_schedule_free", Layout((TensorSpec("w", (2,)),)), [group])


def test_eval_with_beta1_zero_is_refused_once_a_tensor_has_a_z() -> None:
    fresh = FlatOptimizer("adamw_schedule_free", Layout((TensorSpec("w", (2,)),)),
                          [{"train_mode": True, "betas": (0.0, 0.999)}])
    fresh.set_hyperparameters(0, {"train_mode": False})  # nothing to move yet, as the package
    opt = _stepped(betas=(0.0, 0.999))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="beta1 = 0 the parameters y equal z"):
        opt.set_hyperparameters(0, {"train_mode": False})
    _unchanged(opt, before)


def test_an_overflowing_averaging_weight_is_refused_and_changes_nothing() -> None:
    opt = _stepped("radam_schedule_free", r=1e6, silent_sgd_phase=False)  # 1**r at step 1
    before = _snapshot(opt)
    with pytest.raises(FailedPrecondition, match=r"averaging weight .* overflows at step 2"):
        opt.step()
    _unchanged(opt, before)

