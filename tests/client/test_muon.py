"""Muon through the client, against torch.optim.Muon (torch 2.13).

A table of cases, each trained for 30 steps with ``adamserve_client.Muon`` against a
real server (every transport) and with ``torch.optim.Muon`` locally on the same
gradients, in float32 and float64, two parameter groups, a torch LR scheduler and a
tensor whose gradient is None every other step. torch runs the Newton-Schulz
iteration in bfloat16 and adamserve in the master dtype, so the tight comparisons
patch torch's ``_zeropower_via_newtonschulz`` to its dtype (see
tests/engine/test_muon.py) and one compares with unpatched torch at a bfloat16
tolerance. Then the state_dicts both ways, a sharded session, and the refusals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.optim._muon as torch_muon

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor
from adamserve_client.transports.layout import plan_shards
from adamserve_client.transports.sharded import _kept_whole
from tests.engine.test_muon import _newton_schulz_exact

STEPS = 30
SHAPES = [(7, 5), (5, 9), (12, 12), (1, 6)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
BF16_TOL = 2e-3

CASES = {
    "defaults": ({}, {"lr": 5e-3}),
    "rms-adamw": ({"lr": 2e-2, "nesterov": False, "adjust_lr_fn": "match_rms_adamw",
                   "ns_coefficients": (3.0, -3.2, 1.2), "ns_steps": 4},
                  {"momentum": 0.9, "weight_decay": 0.0, "adjust_lr_fn": "original"}),
}


@pytest.fixture
def exact_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _newton_schulz_exact)
    yield


def make_params(dtype: torch.dtype, seed: int = 0,
                shapes: list[tuple[int, int]] = SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def make_grads(step: int, dtype: torch.dtype,
               shapes: list[tuple[int, int]] = SHAPES) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + step)
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    if step % 2:
        grads[2] = None  # no gradient: torch leaves it alone, so must the server
    return grads


def groups(params: list[torch.Tensor], group2: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"params": params[:2]}, {"params": params[2:], **group2}]


def step_both(pairs: list[tuple[list[torch.Tensor], Any]], step: int, dtype: torch.dtype,
              shapes: list[tuple[int, int]] = SHAPES) -> None:
    for params, opt in pairs:
        for p, g in zip(params, make_grads(step, dtype, shapes), strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


def close(ours: list[torch.Tensor], theirs: list[torch.Tensor], tol: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        scale = float(b.abs().max()) or 1.0
        np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), rtol=tol,
                                   atol=tol * scale, err_msg=f"tensor {i} {what}")


def same_state_dicts(ours: dict[str, Any], theirs: dict[str, Any], tol: float) -> None:
    """Our state_dict is torch's: the same entries (momentum_buffer alone) and groups."""
    assert set(ours["state"]) == set(theirs["state"])
    for i, entry in theirs["state"].items():
        assert list(ours["state"][i]) == list(entry) == ["momentum_buffer"]
        mine, value = ours["state"][i]["momentum_buffer"], entry["momentum_buffer"]
        assert isinstance(mine, torch.Tensor) and mine.dtype == value.dtype
        np.testing.assert_allclose(mine.double().numpy(), value.double().numpy(), rtol=tol,
                                   atol=tol * (float(value.abs().max()) or 1.0))
    for mine, other in zip(ours["param_groups"], theirs["param_groups"], strict=True):
        assert set(mine) == set(other)
        for key, value in other.items():
            assert mine[key] == value and type(mine[key]) is type(value), key


def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))


@pytest.mark.usefixtures("exact_torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch(url: str, sid: str, case: str, dtype: torch.dtype) -> None:
    options, group2 = CASES[case]
    remote_params, local_params = make_params(dtype), make_params(dtype)
    opt = ac.Muon(groups(remote_params, group2), server=url, session=sid, **options)
    ref = torch.optim.Muon(groups(local_params, group2), **options)
    scheds = [schedule(opt), schedule(ref)]
    try:
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
            {k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
        for step in range(STEPS):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
            for s in scheds:
                s.step()
            close(remote_params, local_params, TOL[dtype], f"after step {step + 1}")
        assert opt.last_step is not None and opt.last_step.step == STEPS
        same_state_dicts(opt.state_dict(), ref.state_dict(), TOL[dtype])
        info = opt.describe()  # torch's names, choices by name, as the wire carried them
        expected = {**options, **group2}
        assert info.groups[1]["adjust_lr_fn"] == expected.get("adjust_lr_fn")
        assert info.groups[0]["ns_coefficients"] == ref.param_groups[0]["ns_coefficients"]
        assert list(info.lr) == [g["lr"] for g in ref.param_groups]
    finally:
        opt.close(delete=True)


def test_close_to_torchs_bfloat16_iteration(url: str, sid: str) -> None:
    remote_params, local_params = make_params(torch.float32), make_params(torch.float32)
    options, group2 = CASES["defaults"]
    opt = ac.Muon(groups(remote_params, group2), server=url, session=sid, **options)
    ref = torch.optim.Muon(groups(local_params, group2), **options)
    try:
        for step in range(STEPS):
            step_both([(remote_params, opt), (local_params, ref)], step, torch.float32)
        close(remote_params, local_params, BF16_TOL, "against torch's bfloat16 iteration")
    finally:
        opt.close(delete=True)


@pytest.mark.usefixtures("exact_torch")
def test_state_dict_both_ways(url: str, sid: str) -> None:
    dtype = torch.float64
    options, group2 = CASES["rms-adamw"]
    remote_params, local_params = make_params(dtype, 3), make_params(dtype, 3)
    opt = ac.Muon(groups(remote_params, group2), server=url, session=sid, **options)
    ref = torch.optim.Muon(groups(local_params, group2), **options)
    try:
        for step in range(8):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        # ours -> torch, and torch -> ours (a new session with the defaults), mid-run
        theirs_params = [p.detach().clone() for p in remote_params]
        theirs = torch.optim.Muon(groups(theirs_params, {}))
        theirs.load_state_dict(opt.state_dict())
        ours_params = [p.detach().clone() for p in local_params]
        ours = ac.Muon(groups(ours_params, {}), server=url, session=f"{sid}-loaded")
        try:
            ours.load_state_dict(ref.state_dict())
            assert ours.describe().groups[1]["adjust_lr_fn"] == "original"
            assert ours.param_groups[0]["ns_coefficients"] == (3.0, -3.2, 1.2)
            for step in range(8, 16):
                step_both([(remote_params, opt), (local_params, ref),
                           (theirs_params, theirs), (ours_params, ours)], step, dtype)
            close(theirs_params, local_params, 1e-12, "torch, from our state_dict")
            close(ours_params, local_params, 1e-12, "ours, from torch's state_dict")
            same_state_dicts(ours.state_dict(), ref.state_dict(), 1e-12)
        finally:
            ours.close(delete=True)
    finally:
        opt.close(delete=True)


@pytest.mark.usefixtures("exact_torch")
def test_checkpoint_and_attach_keep_the_groups(url: str, sid: str) -> None:
    """A checkpoint holds the groups as the engine keeps them (the choice's index, the
    triple's members): restored and described, they are torch's again."""
    dtype = torch.float64
    options, group2 = CASES["rms-adamw"]
    remote_params, local_params = make_params(dtype, 4), make_params(dtype, 4)
    opt = ac.Muon(groups(remote_params, group2), server=url, session=sid, **options)
    ref = torch.optim.Muon(groups(local_params, group2), **options)
    try:
        for step in range(4):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        saved = opt.state_dict()
        opt.checkpoint()
        step_both([(remote_params, opt)], 4, dtype)
        assert opt.restore_checkpoint(4) == 4
        close(remote_params, local_params, 1e-12, "after the restore")
        same_state_dicts(opt.state_dict(), saved, 0.0)
        info = opt.transport.describe(opt.session_id)  # the restored session's own groups
        assert [g["adjust_lr_fn"] for g in info.groups] == ["match_rms_adamw", "original"]
        assert info.groups[0]["ns_coefficients"] == (3.0, -3.2, 1.2)
        assert info.groups[0]["ns_steps"] == 4
        # another optimizer attaches: the session's parameters, and its steps go on as torch's
        again_params = groups(make_params(dtype, 9), group2)
        again = ac.Muon(again_params, server=url, session=sid, **options)
        flat = [p for g in again_params for p in g["params"]]
        close(flat, local_params, 1e-12, "attached: the session's parameters")
        for step in range(4, 8):
            step_both([(flat, again), (local_params, ref)], step, dtype)
        close(flat, local_params, 1e-12, "the attached optimizer's steps")
        again.close()
    finally:
        opt.close(delete=True)


@pytest.mark.usefixtures("exact_torch")
@pytest.mark.parametrize("wire", ["grpc", "http"])
def test_a_sharded_session_keeps_each_matrix_whole(shard_servers: list[Any], wire: str) -> None:
    shapes = [(40, 30), (6, 50), (20, 20), (3, 3)]
    dtype = torch.float64
    specs = [TensorSpec(f"t{i}", s) for i, s in enumerate(shapes)]
    keep = _kept_whole("muon")
    assert keep is not None
    plan = plan_shards(specs, 3, split_elements=8, whole=keep)
    assert sorted(p.spec.name for shard in plan.shards for p in shard) == [t.name for t in specs]
    transport = ac.ShardedTransport([ac.connect(s.urls[wire]) for s in shard_servers],
                                    split_elements=8)
    remote_params, local_params = make_params(dtype, 5, shapes), make_params(dtype, 5, shapes)
    opt = ac.Muon(groups(remote_params, {"lr": 3e-3}), lr=1e-2, server=transport)
    ref = torch.optim.Muon(groups(local_params, {"lr": 3e-3}), lr=1e-2)
    try:
        for step in range(0, 16, 2):  # every tensor has a gradient (as sharded sessions need)
            step_both([(remote_params, opt), (local_params, ref)], step, dtype, shapes)
        close(remote_params, local_params, 1e-12, "after 8 steps")
        same_state_dicts(opt.state_dict(), ref.state_dict(), 1e-12)
    finally:
        opt.close(delete=True)
        transport.close()


# -- refusals ------------------------------------------------------------------------------


def _absent(url: str, sid: str) -> None:
    with ac.connect(url) as probe, pytest.raises(errors.NotFound):
        probe.describe(sid)


def _torch_error(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("torch raised nothing")


@pytest.mark.parametrize("kwargs", [
    {"lr": -1e-3}, {"momentum": -0.5}, {"weight_decay": -0.1}, {"adjust_lr_fn": "fast"},
    {"lr": torch.tensor([1e-3, 2e-3])},
], ids=["lr", "momentum", "weight_decay", "adjust_lr_fn", "tensor-lr"])
def test_constructor_errors_are_torchs(url: str, sid: str, kwargs: dict[str, Any]) -> None:
    expected = _torch_error(lambda: torch.optim.Muon(make_params(torch.float32), **kwargs))
    with pytest.raises(type(expected)) as raised:
        ac.Muon(make_params(torch.float32), server=url, session=sid, **kwargs)
    assert str(raised.value) == str(expected)
    _absent(url, sid)


def test_only_matrices_and_nothing_is_created(url: str, sid: str) -> None:
    params = [torch.zeros(4, 3), torch.zeros(3)]
    expected = _torch_error(lambda: torch.optim.Muon(params))
    with pytest.raises(ValueError) as raised:
        ac.Muon(params, server=url, session=sid)
    assert str(raised.value) == str(expected) == (
        "Muon only supports 2D parameters whereas we found a parameter with size: "
        "torch.Size([3])")
    _absent(url, sid)
    # the server's own refusal (a client that does not check): nothing created either
    with ac.connect(url) as t, pytest.raises(
            errors.InvalidArgument, match=r"Muon only supports 2D parameters whereas we found "
            r"a parameter with size: \[2, 3, 4\] \(tensor 'conv'\)"):
        t.create_session(SessionSpec(sid, "muon", (TensorSpec("w", (4, 3)),
                                                   TensorSpec("conv", (2, 3, 4)))))
    _absent(url, sid)


def test_ns_steps_of_100_is_refused_before_anything_is_created(url: str, sid: str) -> None:
    with pytest.raises(ValueError, match=r"^Number of steps must be less than 100 for "
                                         r"computational efficiency$"):
        ac.Muon(make_params(torch.float32), server=url, session=sid, ns_steps=100)
    _absent(url, sid)
    with ac.connect(url) as t:
        for group, message in [({"ns_steps": 100.0}, r"ns_steps: expected a whole number in "
                                                     r"\[0, 99\], got 100.0"),
                               ({"adjust_lr_fn": "fast"}, r"adjust_lr_fn: expected one of "
                                r"None, 'original', 'match_rms_adamw', got 'fast'")]:
            with pytest.raises(errors.InvalidArgument, match=message):
                t.create_session(SessionSpec(sid, "muon", (TensorSpec("w", (4, 3)),),
                                             groups=(group,)))
            _absent(url, sid)


def test_bad_changes_are_refused_and_change_nothing(url: str, sid: str) -> None:
    params = make_params(torch.float64)
    opt = ac.Muon(groups(params, {}), adjust_lr_fn="match_rms_adamw", server=url, session=sid)
    try:
        step_both([(params, opt)], 0, torch.float64)
        before, values = opt.state_dict(), [p.clone() for p in params]
        info = opt.describe()
        for changes, message in [
                ({"adjust_lr_fn": "fast"}, r"adjust_lr_fn: expected one of None"),
                ({"ns_steps": 100}, r"ns_steps: expected a whole number in \[0, 99\]"),
                ({"ns_coefficients": (1.0, 2.0)}, r"'ns_coefficients'.* a triple"),
                ({"maximize": True}, r"unknown hyperparameter 'maximize' for muon")]:
            with pytest.raises(errors.InvalidArgument, match=message):
                opt.transport.set_hyperparameters(opt.session_id, 0, changes)
        assert opt.describe().groups == info.groups
        # None travels too (as the wire's unset): back to torch's default
        opt.param_groups[0]["adjust_lr_fn"] = None
        assert opt.describe().groups[0]["adjust_lr_fn"] is None
        opt.param_groups[0]["adjust_lr_fn"] = "match_rms_adamw"
        # a tensor that is not a matrix cannot join, and the optimizer stays as it was
        with pytest.raises(errors.InvalidArgument, match=r"Muon only supports 2D parameters "
                                                         r"whereas we found a parameter with "
                                                         r"size: \[5\]"):
            opt.add_param_group({"params": [torch.zeros(5, dtype=torch.float64)]})
        assert len(opt.param_groups) == 2 and len(opt.describe().tensors) == len(SHAPES)
        with ac.connect(url) as t, pytest.raises(errors.InvalidArgument, match="2D"):
            t.add_tensors(opt.session_id, (TensorSpec("b", (3,)),),
                          initial=[WireTensor("b", (3,), "FP64", np.zeros(3).tobytes())])
        opt.pull()
        for a, b in zip(params, values, strict=True):
            assert torch.equal(a, b)
        same_state_dicts(opt.state_dict(), before, 0.0)
    finally:
        opt.close(delete=True)


def test_a_sparse_gradient_is_torchs_error(url: str, sid: str) -> None:
    params = make_params(torch.float32)
    opt = ac.Muon(params, server=url, session=sid)
    try:
        for p in params:
            p.grad = torch.zeros_like(p).to_sparse()
        local = [q.clone() for q in params]
        for p, q in zip(params, local, strict=True):
            q.grad = p.grad
        expected = _torch_error(torch.optim.Muon(local).step)
        with pytest.raises(RuntimeError) as raised:
            opt.step()
        assert str(raised.value) == str(expected) == "Muon does not support sparse gradients"
        assert opt.describe().step == 0
    finally:
        opt.close(delete=True)


def test_the_switches_torch_does_not_take_are_refused(url: str) -> None:
    with pytest.raises(TypeError, match=r"^Muon.__init__\(\) got an unexpected keyword "
                                        "argument 'foreach'$"):
        ac.RemoteOptimizer(make_params(torch.float32), "muon", server=url, foreach=True)
