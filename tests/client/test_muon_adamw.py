"""MuonWithAdamW (one optimizer, Muon on the ``use_muon`` groups and AdamW on the rest)
against torch.optim.Muon on the matrices plus torch.optim.AdamW on the rest, stepped on
the same gradients (torch 2.13; its Newton-Schulz iteration patched to the parameter's
dtype, as in test_muon.py, for exact parity).

A model of matrices and biases in four interleaved groups (so the state_dict indices of
the two sessions interleave), 30 steps with a torch LR scheduler and a tensor of each
kind whose gradient is None every other step, in float32 and float64, over every
transport; then the state_dict round trip, attaching to both sessions by name, a
group added later, and the refusals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.muon_adamw import MuonWithAdamW
from tests.client.test_muon import exact_torch  # noqa: F401 (a fixture, used by name)

STEPS = 30
# group -> (use_muon, shapes, hyperparameters): Muon, AdamW, Muon, AdamW
GROUPS: list[tuple[bool, list[tuple[int, ...]], dict[str, Any]]] = [
    (True, [(7, 5), (5, 9)], {"lr": 0.02, "weight_decay": 0.01}),
    (False, [(5,), (9,)], {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.01}),
    (True, [(12, 12)], {"lr": 5e-3, "nesterov": False, "adjust_lr_fn": "match_rms_adamw"}),
    (False, [(12,), (2, 3, 4)], {"eps": 1e-6}),
]
SKIPPED = {1, 3}  # flat indices whose gradient is None on odd steps (a matrix, a bias)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def make_params(dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes]
            for _, shapes, _ in GROUPS]


def ours_groups(params: list[list[torch.Tensor]]) -> list[dict[str, Any]]:
    return [{"params": ps, "use_muon": muon, **hyper}
            for ps, (muon, _, hyper) in zip(params, GROUPS, strict=True)]


def torch_pair(params: list[list[torch.Tensor]]) -> tuple[torch.optim.Muon, torch.optim.AdamW]:
    groups = [(muon, {"params": ps, **hyper})
              for ps, (muon, _, hyper) in zip(params, GROUPS, strict=True)]
    return (torch.optim.Muon([g for muon, g in groups if muon]),
            torch.optim.AdamW([g for muon, g in groups if not muon]))


def flat(params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [p for ps in params for p in ps]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad = None if step % 2 and i in SKIPPED else grad


def step_all(runs: list[tuple[list[torch.Tensor], list[Any]]], step: int) -> None:
    for params, opts in runs:
        set_grads(params, step)
        for opt in opts:
            opt.step()


def close(ours: list[torch.Tensor], theirs: list[torch.Tensor], tol: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), rtol=tol,
                                   atol=tol * (float(b.abs().max()) or 1.0),
                                   err_msg=f"tensor {i} {what}")


def same_state(ours: dict[str, Any], theirs: dict[str, Any], tol: float) -> None:
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    for key, value in theirs.items():
        mine = ours[key]
        assert isinstance(mine, torch.Tensor) and mine.dtype == value.dtype, key
        np.testing.assert_allclose(mine.double().numpy(), value.double().numpy(), rtol=tol,
                                   atol=tol * (float(value.abs().max()) or 1.0), err_msg=key)


def torch_state(muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> dict[int, Any]:
    """The two torch optimizers' state by our index (the groups interleaved)."""
    index: dict[str, list[int]] = {"muon": [], "adamw": []}
    start = 0
    for use_muon, shapes, _ in GROUPS:
        index["muon" if use_muon else "adamw"].extend(range(start, start + len(shapes)))
        start += len(shapes)
    out = {}
    for name, opt in (("muon", muon), ("adamw", adamw)):
        for i, entry in opt.state_dict()["state"].items():
            out[index[name][i]] = entry
    return out


def lambda_lr(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))


def _absent(url: str, *names: str) -> None:
    with ac.connect(url) as probe:
        for name in names:
            with pytest.raises(errors.NotFound):
                probe.describe(name)


@pytest.mark.usefixtures("exact_torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_parity_with_torch_muon_plus_adamw(url: str, sid: str, dtype: torch.dtype) -> None:
    remote, local = make_params(dtype), make_params(dtype)
    opt = MuonWithAdamW(ours_groups(remote), server=url, session=sid)
    muon, adamw = torch_pair(local)
    scheds = [lambda_lr(opt), lambda_lr(muon), lambda_lr(adamw)]
    try:
        assert opt.session_ids == {"muon": f"{sid}.muon", "adamw": f"{sid}.adamw"}
        # torch's groups, each with its class's keys and defaults, plus use_muon
        refs = iter(muon.param_groups), iter(adamw.param_groups)
        for group, (use_muon, _, _) in zip(opt.param_groups, GROUPS, strict=True):
            ref = next(refs[0] if use_muon else refs[1])
            assert ({k: v for k, v in group.items() if k not in ("params", "use_muon")}
                    == {k: v for k, v in ref.items() if k != "params"})
        for step in range(STEPS):
            step_all([(flat(remote), [opt]), (flat(local), [muon, adamw])], step)
            for s in scheds:
                s.step()
            close(flat(remote), flat(local), TOL[dtype], f"after step {step + 1}")
        assert opt.muon is not None and opt.muon.last_step is not None
        assert opt.muon.last_step.step == STEPS
        sd = opt.state_dict()
        expected = torch_state(muon, adamw)
        assert sorted(sd["state"]) == sorted(expected) == list(range(len(flat(remote))))
        for i, entry in expected.items():
            same_state(sd["state"][i], entry, TOL[dtype])
        assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3], [4], [5, 6]]
        assert [g["lr"] for g in sd["param_groups"]] == [g["lr"] for g in opt.param_groups]
        # what the scheduler wrote went to the sessions, group by group
        info = opt.describe()
        assert list(info["muon"].lr) == [g["lr"] for g in muon.param_groups]
        assert list(info["adamw"].lr) == [g["lr"] for g in adamw.param_groups]
        assert info["muon"].groups[1]["adjust_lr_fn"] == "match_rms_adamw"
        # opt.state[p]: the same entries, read from the session that holds p
        same_state(opt.state[remote[1][1]], adamw.state[local[1][1]], TOL[dtype])
        same_state(opt.state[remote[2][0]], muon.state[local[2][0]], TOL[dtype])
        opt.zero_grad()
        assert all(p.grad is None for p in flat(remote))
    finally:
        opt.close(delete=True)
    _absent(url, f"{sid}.muon", f"{sid}.adamw")


@pytest.mark.usefixtures("exact_torch")
def test_state_dict_round_trip(url: str, sid: str) -> None:
    dtype = torch.float64
    params = make_params(dtype, 1)
    opt = MuonWithAdamW(ours_groups(params), server=url, session=sid)
    other_params = [[p.clone() for p in ps] for ps in params]
    # another optimizer with every key at its default, to load into
    other = MuonWithAdamW([{"params": ps, "use_muon": muon}
                           for ps, (muon, _, _) in zip(other_params, GROUPS, strict=True)],
                          server=url, session=f"{sid}-other")
    try:
        for step in range(6):
            step_all([(flat(params), [opt])], step)
        for a, b in zip(flat(params), flat(other_params), strict=True):
            b.copy_(a)
        saved = opt.state_dict()
        other.load_state_dict(saved)
        again = other.state_dict()
        assert again["param_groups"] == saved["param_groups"]
        assert sorted(again["state"]) == sorted(saved["state"])
        for i, entry in saved["state"].items():
            same_state(again["state"][i], entry, 0.0)
        # the loaded groups are the ones the sessions step: a change reaches them
        assert other.muon is not None and other.adamw is not None
        assert other.param_groups[2] is other.muon.param_groups[1]
        assert other.param_groups[3] is other.adamw.param_groups[1]
        for o in (opt, other):
            o.param_groups[3]["lr"] = 7e-4
        assert list(other.describe()["adamw"].lr) == [3e-3, 7e-4]
        for step in range(6, 10):
            step_all([(flat(params), [opt]), (flat(other_params), [other])], step)
        close(flat(other_params), flat(params), 0.0, "loaded, then stepped")
        # AdamW's state carries its step; Muon's does not (torch's has none)
        steps = {k: v.step for k, v in other.describe().items()}
        assert steps["adamw"] == 10
        before = other.state_dict()
        # a state_dict whose groups are not ours, algorithm by algorithm, changes nothing
        wrong = {"state": saved["state"], "param_groups": [
            {**g, "use_muon": not g["use_muon"]} if k == 1 else g
            for k, g in enumerate(saved["param_groups"])]}
        with pytest.raises(ValueError, match=r"loaded param_groups\[1\] has use_muon=True; "
                                             r"this optimizer's group 1 has use_muon=False"):
            other.load_state_dict(wrong)
        # AdamW's half is wrong: Muon's is not loaded either
        bad_shape = {"state": {**saved["state"], 5: {"exp_avg": torch.zeros(3, 3)}},
                     "param_groups": saved["param_groups"]}
        with pytest.raises(ValueError, match=r"exp_avg has shape \[3, 3\]"):
            other.load_state_dict(bad_shape)
        assert {k: v.step for k, v in other.describe().items()} == steps
        after = other.state_dict()
        for i, entry in before["state"].items():
            same_state(after["state"][i], entry, 0.0)
        close(flat(other_params), flat(params), 0.0, "after the refused loads")
    finally:
        opt.close(delete=True)
        other.close(delete=True)


@pytest.mark.usefixtures("exact_torch")
def test_attach_checkpoint_and_close(url: str, sid: str) -> None:
    dtype = torch.float64
    remote, local = make_params(dtype, 2), make_params(dtype, 2)
    opt = MuonWithAdamW(ours_groups(remote), server=url, session=sid)
    muon, adamw = torch_pair(local)
    try:
        for step in range(4):
            step_all([(flat(remote), [opt]), (flat(local), [muon, adamw])], step)
        saved = opt.state_dict()
        opt.checkpoint()
        step_all([(flat(remote), [opt])], 4)
        assert opt.restore_checkpoint() == 4
        close(flat(remote), flat(local), 1e-12, "after the restore")
        opt.close()  # a named session stays
        # a new optimizer of that name attaches to both sessions: their parameters
        fresh = make_params(dtype, 9)
        again = MuonWithAdamW(ours_groups(fresh), server=url, session=sid)
        close(flat(fresh), flat(local), 1e-12, "attached")
        assert again.state_dict()["state"].keys() == saved["state"].keys()
        for step in range(4, 8):
            step_all([(flat(fresh), [again]), (flat(local), [muon, adamw])], step)
        close(flat(fresh), flat(local), 1e-12, "the attached optimizer's steps")
        again.close(delete=True)
        _absent(url, f"{sid}.muon", f"{sid}.adamw")
    finally:
        opt.close(delete=True)


@pytest.mark.usefixtures("exact_torch")
def test_a_group_added_later(url: str, sid: str) -> None:
    dtype = torch.float64
    remote, local = make_params(dtype, 3), make_params(dtype, 3)
    opt = MuonWithAdamW(ours_groups(remote)[:1], server=url)  # anonymous, Muon only
    muon = torch.optim.Muon([{"params": local[0], **GROUPS[0][2]}])
    try:
        assert opt.adamw is None and list(opt.session_ids) == ["muon"]
        step_all([(remote[0], [opt]), (local[0], [muon])], 0)
        # the first AdamW group makes its session; a Muon group grows the other
        opt.add_param_group({"params": remote[1], "use_muon": False, **GROUPS[1][2]})
        adamw = torch.optim.AdamW([{"params": local[1], **GROUPS[1][2]}])
        opt.add_param_group({"params": remote[2], "use_muon": True, **GROUPS[2][2]})
        muon.add_param_group({"params": local[2], **GROUPS[2][2]})
        with pytest.raises(ValueError, match=r"Muon only supports 2D parameters whereas we "
                                             r"found a parameter with size: torch.Size\(\[3\]\)"):
            opt.add_param_group({"params": [torch.zeros(3, dtype=dtype)], "use_muon": True})
        assert len(opt.param_groups) == 3 and opt.muon is not None
        assert len(opt.muon.param_groups) == 2
        for step in range(1, 5):
            step_all([(flat(remote[:3]), [opt]), (flat(local[:3]), [muon, adamw])], step)
        close(flat(remote[:3]), flat(local[:3]), 1e-12, "after the groups were added")
        ids = opt.session_ids
    finally:
        opt.close()  # anonymous: both deleted
    _absent(url, *ids.values())


# -- refusals ------------------------------------------------------------------------------


def _torch_error(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("torch raised nothing")


def _groups(**changes: Any) -> list[dict[str, Any]]:
    groups = ours_groups(make_params(torch.float32))
    for key, value in changes.items():
        g, _, name = key.partition("_")
        if value is None:
            groups[int(g[1:])].pop(name)
        else:
            groups[int(g[1:])][name] = value
    return groups


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"g1_use_muon": None}, ValueError,
     r"^param_groups\[1\] has no 'use_muon': each group says which algorithm steps it, "
     r"use_muon=True \(Muon, for 2-D matrices\) or use_muon=False \(AdamW, for the rest\)$"),
    ({"g0_use_muon": 1}, TypeError, r"^param_groups\[0\]: use_muon must be True or False, "
                                    r"got 1$"),
    ({"g0_betas": (0.9, 0.9)}, ValueError,
     r"^param_groups\[0\] \(use_muon=True, Muon\): unknown key\(s\) 'betas' \(that is "
     r"AdamW's\); Muon takes adjust_lr_fn, eps, lr, momentum, nesterov, ns_coefficients, "
     r"ns_steps, weight_decay$"),
    ({"g1_momentum": 0.9, "g1_typo": 1}, ValueError,
     r"^param_groups\[1\] \(use_muon=False, AdamW\): unknown key\(s\) 'momentum', 'typo'; "
     r"AdamW takes amsgrad, betas, capturable, "),
    ({"g2_lr": -1.0}, ValueError, r"^Learning rate should be >= 0 but is: -1.0$"),
    ({"g3_betas": (0.9, 1.5)}, ValueError, r"^Invalid beta parameter at index 1: 1.5$"),
], ids=["no-use_muon", "use_muon-not-bool", "adamw-key-in-muon", "unknown-in-adamw",
        "muon-lr", "adamw-betas"])
def test_bad_groups_are_refused_before_anything_is_created(
        url: str, sid: str, changes: dict[str, Any], error: type[Exception],
        message: str) -> None:
    with pytest.raises(error, match=message):
        MuonWithAdamW(_groups(**changes), server=url, session=sid)
    _absent(url, f"{sid}.muon", f"{sid}.adamw")


def test_torchs_refusals(url: str, sid: str) -> None:
    bias = torch.zeros(3)
    expected = _torch_error(lambda: torch.optim.Muon([torch.zeros(4, 3), bias]))
    with pytest.raises(ValueError) as raised:
        MuonWithAdamW([{"params": [torch.zeros(4, 3), bias], "use_muon": True}],
                      server=url, session=sid)
    assert str(raised.value) == str(expected)
    with pytest.raises(TypeError, match=r"^MuonWithAdamW takes parameter groups, dicts with "
                                        r"'params' and 'use_muon' .* but params\[0\] is Tensor"):
        MuonWithAdamW([torch.zeros(4, 3)], server=url, session=sid)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter "
                                         "group"):
        MuonWithAdamW([{"params": [bias], "use_muon": False},
                       {"params": [bias], "use_muon": False}], server=url, session=sid)
    _absent(url, f"{sid}.muon", f"{sid}.adamw")


def test_a_failed_attach_deletes_only_what_it_created(url: str, sid: str) -> None:
    # a session of the AdamW name holding other tensors: attaching to it fails
    squatter = ac.AdamW([torch.zeros(2)], server=url, session=f"{sid}.adamw")
    try:
        with pytest.raises(ValueError, match=rf"session '{sid}.adamw' holds 1 tensors"):
            MuonWithAdamW(_groups(), server=url, session=sid)
        _absent(url, f"{sid}.muon")  # made, then deleted
        assert squatter.describe().step == 0  # kept
    finally:
        squatter.close(delete=True)


def test_a_groups_algorithm_is_fixed(url: str, sid: str) -> None:
    params = make_params(torch.float32)
    opt = MuonWithAdamW(ours_groups(params), server=url, session=sid)
    try:
        opt.param_groups[1]["use_muon"] = True
        set_grads(flat(params), 0)
        with pytest.raises(ValueError, match=r"param_groups\[1\]: use_muon was False when the "
                                             r"group was added and is now True"):
            opt.step()
        opt.param_groups[1]["use_muon"] = False
        opt.param_groups[3]["lr"] = -1.0  # the server refuses it: neither session steps
        with pytest.raises(errors.InvalidArgument, match=r"lr: expected a value >= 0"):
            opt.step()
        opt.param_groups[3]["lr"] = 1e-3
        assert {k: v.step for k, v in opt.describe().items()} == {"muon": 0, "adamw": 0}
        for p in params[0]:  # torch's refusal, before either session steps
            p.grad = p.grad.to_sparse()
        with pytest.raises(RuntimeError, match=r"^Muon does not support sparse gradients$"):
            opt.step()
        assert {k: v.step for k, v in opt.describe().items()} == {"muon": 0, "adamw": 0}
    finally:
        opt.close(delete=True)
