"""Schedule-free AdamW and RAdam through the client, against facebookresearch's schedulefree.

The package (1.4.1, pinned in the dev extra) is the oracle, as torch.optim is for
test_parity.py, whose loop has no train()/eval(): here a table of cases, each trained
for 30 steps with ``adamserve_client.X`` against a real server (every transport) and
with ``schedulefree.X`` locally on the same gradients, in float32 and float64, two
parameter groups, a torch LR scheduler, one tensor whose gradient is None every
other step, and an ``eval()`` / ``train()`` switch in the middle; then the
state_dicts both ways, checkpoints, attaching, and the refusals.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import schedulefree
import torch

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.tensors import encode
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor
from adamserve_client.transports.base import Sender, Workers
from adamserve_proto.algorithms import ALGORITHMS

STEPS = 30
SHAPES = [(7, 5), (33,), (2, 3, 4), (1,)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
OPTIONS = ("server", "session", "token", "wire_dtype", "master_dtype", "schedule", "timeout",
           "workers", "worker_id", "shared_memory")
NOT_TRAINING = ("Optimizer was not in train mode when step is called. Please insert .train() "
                "and .eval() calls on the optimizer. See documentation for details.")


@dataclass(frozen=True)
class Case:
    name: str
    remote: Callable[..., ac.RemoteOptimizer]
    local: Callable[..., torch.optim.Optimizer]
    options: dict[str, Any] = field(default_factory=dict)
    group2: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("adamw", ac.AdamWScheduleFree, schedulefree.AdamWScheduleFree,
         {"lr": 1e-2, "warmup_steps": 5, "weight_decay": 0.1, "r": 0.5},
         {"lr": 3e-3, "betas": (0.5, 0.99)}),
    Case("radam", ac.RAdamScheduleFree, schedulefree.RAdamScheduleFree,
         {"lr": 1e-2, "weight_decay": 0.1, "r": 1.0}, {"silent_sgd_phase": False}),
    Case("radam-silent", ac.RAdamScheduleFree, schedulefree.RAdamScheduleFree,
         {"lr": 2e-2, "betas": (0.9, 0.99), "weight_lr_power": 1.0}, {"weight_decay": 0.05}),
]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def make_grads(step: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + step)
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    if step % 2:
        grads[2] = None  # no gradient: the package leaves it alone, so must the server
    return grads


def groups(params: list[torch.Tensor], group2: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"params": params[:2]}, {"params": params[2:], **group2}]


def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))


def close(ours: list[torch.Tensor], theirs: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        tol = TOL[b.dtype]
        scale = float(b.abs().max()) or 1.0
        np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), rtol=tol,
                                   atol=tol * scale, err_msg=f"tensor {i} {what}")


def step_both(pairs: list[tuple[list[torch.Tensor], Any]], step: int,
              dtype: torch.dtype) -> None:
    for params, opt in pairs:
        for p, g in zip(params, make_grads(step, dtype), strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


def same_state_dicts(ours: dict[str, Any], theirs: dict[str, Any], tol: float) -> None:
    """Our state_dict is the package's: the same entries and groups, values to ``tol``."""
    assert set(ours["state"]) == set(theirs["state"])
    for i, entry in theirs["state"].items():
        assert list(ours["state"][i]) == list(entry) == ["z", "exp_avg_sq"]
        for key, value in entry.items():
            mine = ours["state"][i][key]
            assert isinstance(mine, torch.Tensor) and mine.dtype == value.dtype
            np.testing.assert_allclose(mine.double().numpy(), value.double().numpy(), rtol=tol,
                                       atol=tol * (float(value.abs().max()) or 1.0))
    for mine, other in zip(ours["param_groups"], theirs["param_groups"], strict=True):
        assert set(mine) == set(other)
        for key, value in other.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-15), key
            else:
                assert mine[key] == value and type(mine[key]) is type(value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_with_schedulefree(url: str, sid: str, case: Case, dtype: torch.dtype) -> None:
    remote_params, local_params = make_params(dtype), make_params(dtype)
    opt = case.remote(groups(remote_params, case.group2), server=url, session=sid,
                      **case.options)
    ref = case.local(groups(local_params, case.group2), **case.options)
    scheds = [schedule(opt), schedule(ref)]
    try:
        assert opt.param_groups[0]["train_mode"] is False  # as the package's
        opt.train()
        ref.train()
        for step in range(STEPS):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
            for s in scheds:
                s.step()
            close(remote_params, local_params, f"after step {step + 1}")
            if step == 14:
                opt.eval()
                ref.eval()
                close(remote_params, local_params, "in eval mode")
                assert [g["train_mode"] for g in opt.param_groups] == [False, False]
                opt.train()
                ref.train()
                close(remote_params, local_params, "back in train mode")
        assert opt.last_step is not None and opt.last_step.step == STEPS
        opt.eval()
        ref.eval()
        close(remote_params, local_params, "in eval mode at the end")
        same_state_dicts(opt.state_dict(), ref.state_dict(), TOL[dtype])
        assert opt.param_groups[1]["k"] == STEPS  # the server's, after state_dict()
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize("case", CASES[:2], ids=[c.name for c in CASES[:2]])
def test_state_dict_both_ways(url: str, sid: str, case: Case) -> None:
    dtype = torch.float64
    remote_params, local_params = make_params(dtype, 3), make_params(dtype, 3)
    opt = case.remote(groups(remote_params, case.group2), server=url, session=sid,
                      **case.options)
    ref = case.local(groups(local_params, case.group2), **case.options)
    try:
        opt.train()
        ref.train()
        for step in range(8):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        # ours -> the package, and the package -> ours (a new session), mid-run
        theirs_params = [p.detach().clone() for p in remote_params]
        theirs = case.local(groups(theirs_params, case.group2), **case.options)
        theirs.load_state_dict(opt.state_dict())
        ours_params = [p.detach().clone() for p in local_params]
        ours = case.remote(groups(ours_params, case.group2), server=url,
                           session=f"{sid}-loaded", **case.options)
        try:
            ours.load_state_dict(ref.state_dict())
            assert [g["train_mode"] for g in ours.param_groups] == [True, True]
            assert ours.param_groups[0]["k"] == 8  # the package's groups, as torch loads them
            for step in range(8, 16):
                step_both([(remote_params, opt), (local_params, ref),
                           (theirs_params, theirs), (ours_params, ours)], step, dtype)
            close(theirs_params, local_params, "the package, from our state_dict")
            close(ours_params, local_params, "ours, from the package's state_dict")
            for o in (opt, ref, theirs, ours):
                o.eval()
            close(theirs_params, local_params, "the package, in eval mode")
            close(ours_params, local_params, "ours, in eval mode")
            same_state_dicts(ours.state_dict(), ref.state_dict(), 1e-12)
        finally:
            ours.close(delete=True)
    finally:
        opt.close(delete=True)


def test_checkpoint_and_attach_keep_the_groups_state(url: str, sid: str) -> None:
    dtype = torch.float64
    remote_params, local_params = make_params(dtype, 4), make_params(dtype, 4)
    opt = ac.AdamWScheduleFree(remote_params, lr=1e-2, warmup_steps=3, server=url, session=sid)
    ref = schedulefree.AdamWScheduleFree(local_params, lr=1e-2, warmup_steps=3)
    try:
        opt.train()
        ref.train()
        for step in range(6):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        saved = opt.state_dict()
        opt.checkpoint()
        for step in range(6, 9):
            step_both([(remote_params, opt)], step, dtype)
        assert opt.restore_checkpoint(6) == 6
        close(remote_params, local_params, "after the restore")
        same_state_dicts(opt.state_dict(), saved, 0.0)
        # another optimizer on the session: it is in train mode with k = 6, as the server
        again = ac.AdamWScheduleFree(make_params(dtype, 9), lr=1e-2, warmup_steps=3, server=url,
                                     session=sid)
        assert again.param_groups[0]["train_mode"] is True and again.param_groups[0]["k"] == 6
        again_params = again.param_groups[0]["params"]
        close(again_params, local_params, "attached: the session's parameters")
        for step in range(6, 10):
            step_both([(again_params, again), (local_params, ref)], step, dtype)
        close(again_params, local_params, "the attached optimizer's steps")
        again.close()
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize("wire", ["grpc", "http"])
def test_a_sharded_session_matches_the_package(shard_servers: list[Any], wire: str) -> None:
    """Three shards, tensors cut between them: each shard keeps the groups' state and
    swaps its pieces; every step carries every gradient (as sharded sessions need)."""
    dtype = torch.float64
    remote_params, local_params = make_params(dtype, 5), make_params(dtype, 5)
    transport = ac.ShardedTransport([ac.connect(s.urls[wire]) for s in shard_servers],
                                 split_elements=8)
    opt = ac.AdamWScheduleFree(groups(remote_params, {"lr": 3e-3}), lr=1e-2, warmup_steps=4,
                               r=0.5, server=transport)
    ref = schedulefree.AdamWScheduleFree(groups(local_params, {"lr": 3e-3}), lr=1e-2,
                                         warmup_steps=4, r=0.5)
    try:
        opt.train()
        ref.train()
        for step in range(0, 24, 2):  # the even steps of make_grads: every tensor has one
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
            if step == 12:
                opt.eval()
                ref.eval()
                close(remote_params, local_params, "in eval mode")
                opt.train()
                ref.train()
        close(remote_params, local_params, "after 12 steps")
        opt.eval()
        ref.eval()
        close(remote_params, local_params, "in eval mode at the end")
        same_state_dicts(opt.state_dict(), ref.state_dict(), 1e-12)
    finally:
        opt.close(delete=True)
        transport.close()


# -- refusals ------------------------------------------------------------------------------


def test_a_step_in_eval_mode_raises_the_packages_exception(url: str, sid: str) -> None:
    params = make_params(torch.float32)
    opt = ac.AdamWScheduleFree(params, server=url, session=sid)
    ref = schedulefree.AdamWScheduleFree(make_params(torch.float32))
    calls: list[int] = []
    try:
        for p, g in zip(params, make_grads(0, torch.float32), strict=True):
            p.grad = g
        for o in (ref, opt):
            with pytest.raises(Exception, match=r"^Optimizer was not in train mode") as raised:
                o.step(lambda: calls.append(1))  # before the closure runs, as the package
            assert type(raised.value) is Exception and str(raised.value) == NOT_TRAINING
        assert calls == []
        assert opt.describe().step == 0
        opt.train()
        for _ in range(3):  # after one step y = z: eval() would move nothing
            opt.step()
        before = [p.clone() for p in params]
        opt.eval()
        # the server refuses too: a client whose groups say train while the session is not
        info = opt.describe()
        opt.param_groups[0]["train_mode"] = True
        with pytest.raises(errors.FailedPrecondition, match="not in train mode") as refused:
            opt.step()
        assert refused.value.reason == "FAILED_PRECONDITION"
        assert opt.describe().step == info.step == 3
        assert opt.param_groups[0]["train_mode"] is False  # the server's, from describe()
        opt.pull()
        for a, b in zip(params, before, strict=True):
            assert not torch.equal(a, b)  # x, not y: eval() moved them, the step did not
        opt.train()
        for a, b in zip(params, before, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"warmup_steps": -5}, "warmup_steps: expected a whole number >= 0, got -5.0"),
    ({"warmup_steps": 2.5}, "warmup_steps: expected a whole number, got 2.5"),
    ({"r": -1.0}, "r: expected a value >= 0"),
    ({"betas": (0.9, 1.0)}, r"beta2: expected a value in \[0, 1\)"),
])
def test_bad_hyperparameters_are_named_and_create_nothing(url: str, sid: str,
                                                          kwargs: dict[str, Any],
                                                          message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        ac.AdamWScheduleFree(make_params(torch.float32), server=url, session=sid, **kwargs)
    probe = ac.connect(url)
    try:
        with pytest.raises(errors.NotFound):
            probe.describe(sid)
    finally:
        probe.close()


def test_bad_changes_are_refused_and_change_nothing(url: str, sid: str) -> None:
    params = make_params(torch.float64)
    opt = ac.AdamWScheduleFree(params, betas=(0.0, 0.999), server=url, session=sid)
    try:
        opt.train()
        for p, g in zip(params, make_grads(0, torch.float64), strict=True):
            p.grad = g
        opt.step()
        before = opt.state_dict()
        values = [p.clone() for p in params]
        with pytest.raises(errors.InvalidArgument, match="k: the per-group state"):
            opt.transport.set_hyperparameters(opt.session_id, 0, {"k": 100})
        with pytest.raises(errors.InvalidArgument, match="beta1 = 0 the parameters y equal z"):
            opt.eval()
        assert opt.param_groups[0]["train_mode"] is True
        with pytest.raises(errors.InvalidArgument, match="unknown hyperparameter 'amsgrad'"):
            opt.transport.set_hyperparameters(opt.session_id, 0, {"amsgrad": True})
        opt.pull()
        for a, b in zip(params, values, strict=True):
            assert torch.equal(a, b)
        same_state_dicts(opt.state_dict(), before, 0.0)
    finally:
        opt.close(delete=True)


def test_the_mode_does_not_switch_while_a_round_is_open(url: str, sid: str) -> None:
    """A round's gradients are taken at the parameters it started from (as SetParameters)."""
    specs = (TensorSpec("w", (3, 2)),)
    wire = [WireTensor("w", (3, 2), "FP32", encode(np.ones((3, 2), np.float32), "FP32"))]
    with ac.connect(url) as t:
        t.create_session(SessionSpec(sid, "adamw_schedule_free", specs,
                                     groups=({"train_mode": True},), workers=Workers(count=2)))
        try:
            assert t.push(sid, wire, sender=Sender("a", 1), base_step=0).pending
            with pytest.raises(errors.FailedPrecondition, match="switch train_mode between "
                                                                "steps") as refused:
                t.set_hyperparameters(sid, 0, {"train_mode": False})
            assert refused.value.reason == "ROUND_OPEN"
            assert t.push(sid, wire, sender=Sender("b", 1), base_step=0).step == 1
            info = t.set_hyperparameters(sid, 0, {"train_mode": False})
            assert info.groups[0]["train_mode"] is False and info.groups[0]["k"] == 1
        finally:
            t.delete_session(sid)


def test_the_switches_the_package_does_not_take_are_refused(url: str) -> None:
    with pytest.raises(TypeError, match=r"^AdamWScheduleFree.__init__\(\) got an unexpected "
                                        "keyword argument 'fused'$"):
        ac.RemoteOptimizer(make_params(torch.float32), "adamw_schedule_free", server=url,
                           fused=True)
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'k'"):
        ac.RemoteOptimizer(make_params(torch.float32), "radam_schedule_free", server=url, k=3)


def test_the_generic_optimizer_keeps_the_packages_groups(url: str, sid: str) -> None:
    """RemoteOptimizer(params, "adamw_schedule_free") has the class's groups (the package
    reads ``foreach`` from them), so its state_dict loads into the package."""
    params = make_params(torch.float64, 6)
    opt = ac.RemoteOptimizer(params, "adamw_schedule_free", server=url, session=sid, lr=1e-2)
    try:
        assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == {
            k: v for k, v in schedulefree.AdamWScheduleFree(make_params(torch.float64),
                                                            lr=1e-2).param_groups[0].items()
            if k != "params"}
        theirs = schedulefree.AdamWScheduleFree([p.detach().clone() for p in params])
        theirs.load_state_dict(opt.state_dict())
        theirs.train()
        for p in theirs.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        theirs.step()  # it reads group["foreach"]: a KeyError had our groups lacked it
        assert theirs.param_groups[0]["k"] == 1
    finally:
        opt.close(delete=True)


# -- the classes ---------------------------------------------------------------------------


def _arguments(cls: type) -> list[tuple[str, Any, Any, type]]:
    return [(p.name, p.kind, p.default, type(p.default))
            for p in inspect.signature(cls).parameters.values() if p.name != "params"]


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "RAdamScheduleFree"])
def test_signature_and_defaults_are_the_packages(name: str) -> None:
    ours, theirs = _arguments(getattr(ac, name)), _arguments(getattr(schedulefree, name))
    assert ours[:len(theirs)] == theirs
    assert [a[0] for a in ours[len(theirs):]] == list(OPTIONS)
    row = next(r for r in ALGORITHMS.values() if r.oracle == f"schedulefree.{name}")
    for arg, kind, default, _ in ours:
        if arg in OPTIONS:
            assert kind is inspect.Parameter.KEYWORD_ONLY and default is None, arg
        elif arg in row.switches:
            assert default is row.switch_default(arg), arg
        else:
            assert default is row.defaults[arg], arg
    assert {a[0] for a in ours} - set(OPTIONS) == set(row.defaults) | row.switches
    # the groups start as the package's: its hyperparameters, switches and state
    local = [torch.zeros(2)]
    package_group = getattr(schedulefree, name)(local).param_groups[0]
    assert {k: v for k, v in package_group.items() if k != "params"} == {
        **row.defaults, **{k: row.switch_default(k) for k in row.switches}, **row.group_state}
