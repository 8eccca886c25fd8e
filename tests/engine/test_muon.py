"""Muon against torch.optim.Muon (torch 2.13): a table of cases, the state_dict, refusals.

torch runs the Newton-Schulz iteration in bfloat16, adamserve in the state dtype. So
the tight comparisons (float64 1e-12, float32 1e-5 relative, 30 steps) are against
torch with ``torch.optim._muon._zeropower_via_newtonschulz`` replaced by the same
function without the ``.bfloat16()`` cast (``_single_tensor_muon`` looks it up as a
module global); one case runs unpatched torch, at a bfloat16 tolerance.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.optim._muon as torch_muon

from adamserve.engine import statedict
from adamserve.engine.algorithms import Algorithm as A
from adamserve.engine.algorithms import HyperparameterError, resolve_hyperparameters
from adamserve.engine.kernels_cpu import SERIAL_BELOW
from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec

# wide, tall, square, a row, an empty one, one over several kernel blocks, one past the
# serial cutoff
SHAPES = [(7, 5), (5, 9), (40, 40), (1, 6), (0, 4), (300, 200), (256, 520)]
assert SERIAL_BELOW <= 256 * 520
NO_GRAD_ODD = 2  # this tensor has no gradient every other step (torch leaves it alone)
STEPS = 30
TOL = {"float64": 1e-12, "float32": 1e-5}
BF16_TOL = 2e-3  # unpatched torch: its iteration in bfloat16


def _newton_schulz_exact(grad: torch.Tensor, ns_coefficients: tuple[float, float, float],
                         ns_steps: int, eps: float) -> torch.Tensor:
    """torch's _zeropower_via_newtonschulz without the cast to bfloat16."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    a, b, c = ns_coefficients
    ortho = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, update, ortho, beta=a)
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    return ortho


@pytest.fixture
def exact_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _newton_schulz_exact)
    yield


@dataclass(frozen=True)
class Case:
    options: dict[str, Any] = field(default_factory=dict)
    group2: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"


CASES = [
    Case({}, {"lr": 5e-3}),
    Case({"lr": 2e-2, "nesterov": False, "weight_decay": 0.0}, {"momentum": 0.9}),
    Case({"adjust_lr_fn": "match_rms_adamw", "ns_steps": 3,
          "ns_coefficients": (3.0, -3.2, 1.2)}, {"adjust_lr_fn": "original", "eps": 1e-3}),
    Case({"lr": 1e-2, "momentum": 0.0, "weight_decay": 0.3}, {"ns_steps": 0, "nesterov": False}),
]


def _run(case: Case, dtype: str, two_groups: bool, rng: np.random.Generator,
         shapes: list[tuple[int, int]] = SHAPES) -> tuple[
             FlatOptimizer, list[torch.Tensor], Any]:
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tparams = [torch.tensor(p, requires_grad=True) for p in p0]
    groups = [dict(case.options), {**case.options, **case.group2}] if two_groups else [
        dict(case.options)]
    layout = Layout(tuple(TensorSpec(f"t{i}", s, i % len(groups))
                          for i, s in enumerate(shapes)))
    topt = torch.optim.Muon([{"params": tparams[g::len(groups)], **h}
                             for g, h in enumerate(groups)], **case.options)
    ours = FlatOptimizer("muon", layout, groups, dtype=dtype,
                         params=np.concatenate([p.ravel() for p in p0]))
    for step in range(STEPS):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        active = np.ones(len(shapes), dtype=bool)
        if step % 2:
            active[NO_GRAD_ODD] = False
        for i, (t, g) in enumerate(zip(tparams, grads, strict=True)):
            t.grad = torch.tensor(g, dtype=tdtype) if active[i] else None
        topt.step()
        ours.grad[:] = np.concatenate([g.ravel() for g in grads])
        assert not ours.step(active).skipped
    return ours, tparams, topt


def _close(ours: np.ndarray, ref: np.ndarray, tol: float, what: str) -> None:
    scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.usefixtures("exact_torch")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("two_groups", [False, True], ids=["1group", "2groups"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch_with_its_iteration_in_the_state_dtype(case: Case, two_groups: bool,
                                                             dtype: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{case.id}/{two_groups}/{dtype}".encode()))
    ours, tparams, topt = _run(case, dtype, two_groups, rng)
    for i, t in enumerate(tparams):
        _close(ours.tensor(ours.param, i), t.detach().numpy(), TOL[dtype], f"t{i}")
        _close(ours.tensor(ours.slots["momentum_buffer"], i),
               topt.state[t]["momentum_buffer"].numpy(), TOL[dtype], f"buffer of t{i}")
        assert set(topt.state[t]) == {"momentum_buffer"}  # no step, in torch's or ours
    assert ours.step_count == STEPS
    assert int(ours.seg_step[NO_GRAD_ODD]) == STEPS // 2


def test_close_to_torchs_bfloat16_iteration() -> None:
    """Unpatched torch: its Newton-Schulz in bfloat16 (slow on a CPU: small matrices),
    ours in float32."""
    rng = np.random.default_rng(7)
    ours, tparams, _ = _run(CASES[0], "float32", True, rng, SHAPES[:4])
    for i, t in enumerate(tparams):
        _close(ours.tensor(ours.param, i), t.detach().numpy(), BF16_TOL, f"t{i}")


@pytest.mark.usefixtures("exact_torch")
def test_state_dict_both_ways_with_torch() -> None:
    rng = np.random.default_rng(11)
    case = CASES[2]
    ours, _, topt = _run(case, "float64", True, rng)
    # ours -> torch: torch's own format, and a torch.optim.Muon that loads it steps as we do
    exported = statedict.export_state(ours)
    theirs = topt.state_dict()
    order = [i for g in (0, 1) for i in range(g, len(SHAPES), 2)]  # torch's index -> ours
    for g_ours, g_theirs in zip(exported["param_groups"], theirs["param_groups"], strict=True):
        assert {k: v for k, v in g_ours.items() if k not in ("params", "param_names")} == {
            k: v for k, v in g_theirs.items() if k != "params"}
        assert g_ours["params"] == [order[k] for k in g_theirs["params"]]
        assert type(g_ours["ns_steps"]) is int and type(g_ours["ns_coefficients"]) is tuple
    assert sorted(exported["state"]) == sorted(order[k] for k in theirs["state"])
    for k, entry in theirs["state"].items():
        assert set(exported["state"][order[k]]) == {"momentum_buffer"}
        np.testing.assert_allclose(exported["state"][order[k]]["momentum_buffer"],
                                   entry["momentum_buffer"].numpy(), rtol=1e-12, atol=1e-14)
    twin = [torch.tensor(ours.tensor(ours.param, i), requires_grad=True)
            for i in range(len(SHAPES))]
    loaded = torch.optim.Muon([{"params": twin[0::2]}, {"params": twin[1::2]}])
    loaded.load_state_dict({
        "state": {k: {"momentum_buffer": torch.tensor(
            exported["state"][order[k]]["momentum_buffer"])} for k in theirs["state"]},
        "param_groups": [{**{k: v for k, v in g.items() if k != "param_names"},
                          "params": t["params"]}
                         for g, t in zip(exported["param_groups"], theirs["param_groups"],
                                         strict=True)]})
    # torch -> ours: a fresh session takes torch's state_dict (its names say which is which)
    fresh = FlatOptimizer("muon", ours.layout, [{}, {}], dtype="float64",
                          params=ours.backend.to_host(ours.param).copy())
    statedict.import_state(fresh, {
        "state": {k: {"momentum_buffer": v["momentum_buffer"].numpy()}
                  for k, v in theirs["state"].items()},
        "param_groups": [{**g, "param_names": [f"t{order[k]}" for k in g["params"]]}
                         for g in theirs["param_groups"]]})
    assert fresh.groups == ours.groups
    for _ in range(3):
        grads = [rng.standard_normal(s) for s in SHAPES]
        for t, g in zip(twin, grads, strict=True):
            t.grad = torch.tensor(g)
        loaded.step()
        fresh.grad[:] = np.concatenate([g.ravel() for g in grads])
        fresh.step()
    for i, t in enumerate(twin):
        _close(fresh.tensor(fresh.param, i), t.detach().numpy(), 1e-12, f"t{i}")


def test_only_matrices() -> None:
    layout = Layout((TensorSpec("w", (4, 3)), TensorSpec("b", (3,))))
    with pytest.raises(ValueError, match=r"^Muon only supports 2D parameters whereas we found "
                       r"a parameter with size: \[3\] \(tensor 'b'\)"):
        FlatOptimizer("muon", layout)
    opt = FlatOptimizer("muon", Layout((TensorSpec("w", (4, 3)),)), params=np.ones(12))
    before = (opt.layout, opt.backend.to_host(opt.param).copy(), dict(opt.slots))
    for shape in [(2, 3, 4), (), (5,)]:
        with pytest.raises(ValueError, match=r"Muon only supports 2D parameters"):
            opt.add_tensors([TensorSpec("x", shape)], np.zeros(int(np.prod(shape))))
    assert opt.layout == before[0] and opt.slots == before[2]
    np.testing.assert_array_equal(opt.param, before[1])


@pytest.mark.parametrize(("given", "message"), [
    ({"adjust_lr_fn": "fast"},
     r"adjust_lr_fn: expected one of None, 'original', 'match_rms_adamw', got 'fast'"),
    ({"adjust_lr_fn": 1.5}, r"adjust_lr_fn: expected one of None"),
    ({"ns_steps": 100}, r"ns_steps: expected a whole number in \[0, 99\], got 100.0"),
    ({"ns_steps": 2.5}, r"ns_steps: expected a whole number, got 2.5"),
    ({"ns_coefficients": (1.0, 2.0)}, r"ns_coefficients: expected 3 values \(ns_a, ns_b, "
                                      r"ns_c\)"),
    ({"momentum": -0.1}, r"momentum: expected a value >= 0, got -0.1"),
    ({"maximize": True}, r"unknown hyperparameter 'maximize' for muon"),
])
def test_bad_hyperparameters(given: dict[str, Any], message: str) -> None:
    with pytest.raises(HyperparameterError, match=message):
        resolve_hyperparameters(A.MUON, given)


def test_choices_and_triples_round_trip() -> None:
    h = resolve_hyperparameters(A.MUON, {"adjust_lr_fn": "match_rms_adamw",
                                         "ns_coefficients": [1.0, -2.0, 0.5]})
    assert (h["adjust_lr_fn"], h["ns_a"], h["ns_b"], h["ns_c"]) == (2.0, 1.0, -2.0, 0.5)
    # as checkpoints keep a group (numbers only), and back under torch's names
    assert resolve_hyperparameters(A.MUON, dict(h)) == h
    torch_style = statedict.torch_group(h)
    assert torch_style["adjust_lr_fn"] == "match_rms_adamw"
    assert torch_style["ns_coefficients"] == (1.0, -2.0, 0.5)
    assert statedict.torch_group(resolve_hyperparameters(A.MUON, {}))["adjust_lr_fn"] is None
