"""Adafactor in the engine, against torch.optim.Adafactor (torch 2.13).

test_parity.py's table holds the plain cases; here the shapes that exercise the
factored statistics' task tables (many rows and column stripes, a batch of matrices,
a row or a column of one, empty tensors, a 0-d tensor), partial steps, a tensor
added mid-run, a server-side schedule, the memory of the factored slots, and the
torch-format state both ways with its refusals.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from adamserve.engine import statedict
from adamserve.engine.optimizer import ClipConfig, FlatOptimizer, Layout, TensorSpec
from adamserve.engine.schedules import schedule_from_dict
from adamserve.sessions.session import TENSOR_OVERHEAD, SessionConfig, state_bytes

TOL = {"float64": 1e-12, "float32": 1e-5}
# 70 x 1100: 3 rows a task, 18 column stripes of 30 tasks; (3, 70, 130): a batch of 3.
# Empty tensors step (nothing to update) where torch's step divides by zero: torch is
# not given theirs.
SHAPES = [(70, 1100), (3, 70, 130), (1, 9), (9, 1), (5,), (), (0, 4), (2, 0, 3), (1,)]


def _compare(ours: Any, ref: Any, tol: float, what: str) -> None:
    ref = np.asarray(ref, dtype=np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=tol,
                               atol=tol * (scale or 1.0), err_msg=what)


def _pair(dtype: str, groups: list[dict[str, Any]], shapes: list[tuple[int, ...]] = SHAPES,
          seed: int = 0, **kw: Any) -> tuple[FlatOptimizer, torch.optim.Adafactor,
                                             list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tparams = [torch.tensor(p, requires_grad=True) for p in p0]
    # group by group, so that torch's state_dict indices are the layout's
    owner = [i * len(groups) // len(shapes) for i in range(len(shapes))]
    topt = torch.optim.Adafactor([{"params": [t for t, g in zip(tparams, owner, strict=True)
                                              if g == k], **h} for k, h in enumerate(groups)])
    layout = Layout(tuple(TensorSpec(f"t{i}", s, g)
                          for i, (s, g) in enumerate(zip(shapes, owner, strict=True))))
    ours = FlatOptimizer("adafactor", layout, groups, dtype=dtype,
                         params=np.concatenate([p.ravel() for p in p0]), **kw)
    return ours, topt, tparams


def _same(ours: FlatOptimizer, topt: torch.optim.Adafactor, tparams: list[torch.Tensor],
          dtype: str) -> None:
    for i, t in enumerate(tparams):
        if t.numel() == 0:
            continue
        _compare(ours.tensor(ours.param, i), t.detach().numpy(), TOL[dtype], f"t{i}")
        st = topt.state.get(t, {})
        held = {s for s in ("row_var", "col_var", "variance") if ours.slot_shape(s, i) is not None}
        if st:
            assert held == set(st) - {"step"}, i
            assert ours.seg_step[i] == int(st["step"])
            for slot in held:
                _compare(ours.slot_tensor(slot, i), st[slot].numpy(), TOL[dtype], f"{slot} {i}")
        else:
            assert ours.seg_step[i] == 0


def _step(ours: FlatOptimizer, tparams: list[torch.Tensor], topt: torch.optim.Adafactor,
          rng: np.random.Generator, dtype: str, active: list[bool] | None = None) -> None:
    grads = [rng.standard_normal(tuple(t.shape)).astype(dtype) for t in tparams]
    for k, (t, g) in enumerate(zip(tparams, grads, strict=True)):
        t.grad = torch.tensor(g) if (active is None or active[k]) and g.size else None
    topt.step()
    ours.grad[:] = np.concatenate([g.ravel() for g in grads])
    ours.step(None if active is None else np.array(active))


@pytest.fixture(params=["float64", "float32"])
def dtype(request: pytest.FixtureRequest) -> Any:
    tdtype = torch.float64 if request.param == "float64" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)  # torch's step tensors follow it
    yield request.param
    torch.set_default_dtype(previous)


def test_the_task_tables_cover_every_shape(dtype: str) -> None:
    groups = [{"lr": 0.05, "weight_decay": 0.1}, {"beta2_decay": -0.6, "eps": (1e-20, 1e-3)}]
    ours, topt, tparams = _pair(dtype, groups)
    rng = np.random.default_rng(1)
    for _ in range(30):
        _step(ours, tparams, topt, rng, dtype)
    _same(ours, topt, tparams, dtype)


def test_partial_steps_leave_the_others_alone(dtype: str) -> None:
    """A tensor without a gradient (torch skips it): its statistics and step stay."""
    ours, topt, tparams = _pair(dtype, [{"lr": 0.02}, {"maximize": True, "d": 1.5}], seed=2)
    rng = np.random.default_rng(3)
    for k in range(20):
        _step(ours, tparams, topt, rng, dtype,
              active=[(i + k) % 3 != 0 for i in range(len(SHAPES))])
    _same(ours, topt, tparams, dtype)


def test_tensors_added_mid_run_start_fresh(dtype: str) -> None:
    shapes = [(30, 40), (7,)]
    ours, topt, tparams = _pair(dtype, [{"lr": 0.03}], shapes, seed=4)
    rng = np.random.default_rng(5)
    for _ in range(4):
        _step(ours, tparams, topt, rng, dtype)
    more = [rng.standard_normal(s).astype(dtype) for s in [(2, 6, 5), (11, 3)]]
    extra = [torch.tensor(x, requires_grad=True) for x in more]
    topt.add_param_group({"params": extra, "lr": 0.01, "weight_decay": 0.2})
    ours.add_tensors([TensorSpec("a", (2, 6, 5), 1), TensorSpec("b", (11, 3), 1)],
                     np.concatenate([x.ravel() for x in more]),
                     group={"lr": 0.01, "weight_decay": 0.2})
    for _ in range(6):
        _step(ours, tparams + extra, topt, rng, dtype)
    _same(ours, topt, tparams + extra, dtype)
    assert list(ours.seg_step) == [10, 10, 6, 6]


def test_a_server_schedule_moves_rho_and_the_decay_as_torchs_scheduler_does() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        ours, topt, tparams = _pair("float64", [{"lr": 0.2, "weight_decay": 0.5}],
                                    [(12, 8), (6,)], seed=6,
                                    schedule=schedule_from_dict({"kind": "cosine",
                                                                 "total_steps": 20}))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=20)
        rng = np.random.default_rng(7)
        for _ in range(20):
            _step(ours, tparams, topt, rng, "float64")
            sched.step()
        _same(ours, topt, tparams, "float64")
    finally:
        torch.set_default_dtype(torch.float32)


def test_clipping_scales_the_gradient_first() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        ours, topt, tparams = _pair("float64", [{}], [(20, 30), (4,)], seed=8,
                                    clip=ClipConfig(max_norm=0.5))
        rng = np.random.default_rng(9)
        for _ in range(10):
            grads = [rng.standard_normal(tuple(t.shape)) for t in tparams]
            for t, g in zip(tparams, grads, strict=True):
                t.grad = torch.tensor(g)
            torch.nn.utils.clip_grad_norm_(tparams, 0.5)
            topt.step()
            ours.grad[:] = np.concatenate([g.ravel() for g in grads])
            ours.step()
        _same(ours, topt, tparams, "float64")
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_factored_state_costs_rows_plus_columns() -> None:
    shapes = [(1000, 300), (4, 50, 60), (77,), ()]
    layout = Layout(tuple(TensorSpec(f"t{i}", s) for i, s in enumerate(shapes)))
    opt = FlatOptimizer("adafactor", layout)
    assert {n: opt.slot_size(n) for n in opt.slots} == {
        "row_var": 1000 + 4 * 50, "col_var": 300 + 4 * 60, "variance": 77 + 1}
    assert opt.slot_bytes() == (1200 + 540 + 78) * 4
    # param and grad of the model's size, the statistics of its rows and columns, and
    # the per-tensor overhead
    overhead = len(layout) * TENSOR_OVERHEAD
    assert state_bytes(SessionConfig("adafactor", layout.tensors)) == (
        2 * layout.size * 4 + (1200 + 540 + 78) * 4 + overhead)
    assert state_bytes(SessionConfig("adagrad", layout.tensors)) == 3 * layout.size * 4 + overhead
    assert opt.slot_tensor("row_var", 1).shape == (4, 50, 1)
    assert opt.slot_tensor("col_var", 1).shape == (4, 1, 60)
    assert opt.slot_tensor("variance", 3).shape == ()
    with pytest.raises(KeyError, match="keeps no 'variance'"):
        opt.slot_tensor("variance", 0)


def test_state_dict_both_ways_with_torch(dtype: str) -> None:
    groups = [{"lr": 0.05}, {"weight_decay": 0.1, "eps": (1e-25, 2e-3)}]
    ours, topt, tparams = _pair(dtype, groups, seed=10)
    rng = np.random.default_rng(11)
    for _ in range(5):
        _step(ours, tparams, topt, rng, dtype)
    sd = statedict.export_state(ours)
    theirs = topt.state_dict()
    for i, entry in theirs["state"].items():
        assert set(sd["state"][i]) == set(entry)
        for key, value in entry.items():
            mine = sd["state"][i][key]
            if key == "step":
                assert mine == float(value)
            else:
                assert mine.shape == tuple(value.shape), (i, key)
                _compare(mine, value.numpy(), TOL[dtype], f"{key} of {i}")
    for mine, other in zip(sd["param_groups"], theirs["param_groups"], strict=True):
        assert mine["eps"] == other["eps"]
        assert {k: mine[k] for k in ("lr", "beta2_decay", "d", "weight_decay", "maximize")} == {
            k: other[k] for k in ("lr", "beta2_decay", "d", "weight_decay", "maximize")}
    # torch's state_dict into a fresh optimizer (torch's tensors, its step tensors): it
    # goes on as torch does
    fresh = FlatOptimizer("adafactor", ours.layout, [{}, {}], dtype=dtype,
                          params=ours.backend.to_host(ours.param).copy())
    statedict.import_state(fresh, {"state": {i: {k: v.numpy() for k, v in e.items()}
                                             for i, e in theirs["state"].items()},
                                   "param_groups": theirs["param_groups"]})
    # torch's eps1 None is ours (kept as NaN, exported as None again)
    assert [statedict.torch_group(h) for h in fresh.groups] == [
        statedict.torch_group(h) for h in ours.groups]
    assert fresh.groups[0]["eps1"] != fresh.groups[0]["eps1"]
    for _ in range(5):
        _step(fresh, tparams, topt, rng, dtype)
    _same(fresh, topt, tparams, dtype)


def test_eps1_none_is_kept_and_exported_as_none() -> None:
    layout = Layout((TensorSpec("w", (3, 4)),))
    opt = FlatOptimizer("adafactor", layout, [{"eps": (1e-5, 1e-3)}])
    assert opt.groups[0]["eps1"] == 1e-5
    opt.set_hyperparameters(0, {"eps1": None})
    assert math.isnan(float(opt.groups[0]["eps1"]))
    assert statedict.torch_group(opt.groups[0])["eps"] == (None, 1e-3)
    opt.set_hyperparameters(0, {"eps": (2e-6, 1e-2)})
    assert statedict.torch_group(opt.groups[0])["eps"] == (2e-6, 1e-2)


@pytest.mark.parametrize(("group", "message"), [
    ({"beta2_decay": 0.1}, r"beta2_decay: expected a value in \[-1e\+06, 0\], got 0.1"),
    ({"d": 0.5}, r"d: expected a value in \[1, 1e\+06\], got 0.5"),
    ({"eps": (-1.0, 1e-3)}, "eps1: expected a value >= 0, got -1.0"),
    ({"eps": (None, -1e-3)}, "eps2: expected a value >= 0"),
    ({"eps": (None, None)}, "eps2: expected a number, got None"),
    ({"eps": (1e-3,)}, r"eps: expected 2 values \(eps1, eps2\), got \(0.001,\)"),
    ({"lr": -1.0}, "lr: expected a value >= 0"),
    ({"betas": (0.9, 0.99)}, "unknown hyperparameter 'beta1' for adafactor"),
])
def test_bad_hyperparameters_are_named(group: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlatOptimizer("adafactor", Layout((TensorSpec("w", (3, 4)),)), [group])


def test_a_bad_state_dict_is_refused_and_changes_nothing() -> None:
    layout = Layout((TensorSpec("w", (6, 4)), TensorSpec("b", (4,))))
    opt = FlatOptimizer("adafactor", layout, dtype="float64",
                        params=np.arange(layout.size, dtype=np.float64))
    opt.grad[:] = 1.0
    opt.step()
    before = statedict.export_state(opt)
    good = statedict.export_state(opt)
    cases = [
        ({0: {**good["state"][0], "row_var": np.zeros((4, 1))}}, r"row_var has shape \[4, 1\], "
         r"expected \[6, 1\]"),
        ({0: {"step": 1.0, "row_var": np.zeros((6, 1))}}, "missing 'col_var'"),
        ({1: {"step": 1.0, "variance": np.zeros((4, 1))}}, r"variance has shape \[4, 1\]"),
        ({0: {**good["state"][0], "step": 1.5}}, "step must be a whole number"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            statedict.import_state(opt, {"state": state, "param_groups": good["param_groups"]})
        after = statedict.export_state(opt)
        for i, entry in before["state"].items():
            for key, value in entry.items():
                np.testing.assert_array_equal(after["state"][i][key], value)
    bad_groups = [{**good["param_groups"][0], "d": 0.0}]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: d: expected a value in \[1"):
        statedict.import_state(opt, {"state": good["state"], "param_groups": bad_groups})
    assert opt.groups[0]["d"] == 1.0
