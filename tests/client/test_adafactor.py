"""Adafactor through the client, against torch.optim.Adafactor (torch 2.13).

A table of cases, each trained for 30 steps with ``adamserve_client.Adafactor``
against a real server (every transport) and with ``torch.optim.Adafactor`` locally on
the same gradients, in float32 and float64: two parameter groups, 1-D, 2-D, 3-D, 0-d
and one-element tensors, a torch LR scheduler, one tensor whose gradient is None every
other step; then the state_dicts both ways, eps1's None on the wire, checkpoints, a
sharded session (matrices kept whole), the memory the factored state takes, and the
refusals.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.tensors import encode
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor
from adamserve_client.transports.layout import plan_shards
from adamserve_proto.algorithms import ALGORITHMS

STEPS = 30
SHAPES = [(7, 5), (33,), (2, 3, 4), (1,), (), (12, 40)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
OPTIONS = ("server", "session", "token", "wire_dtype", "master_dtype", "schedule", "timeout",
           "workers", "worker_id", "shared_memory")
ROW = ALGORITHMS["adafactor"]


@dataclass(frozen=True)
class Case:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    group2: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("defaults", {}, {"lr": 3e-3}),
    Case("wd-maximize-eps-d", {"lr": 0.05, "weight_decay": 0.1, "maximize": True,
                               "eps": (1e-30, 1e-3), "d": 2.0},
         {"beta2_decay": -0.5, "eps": (None, 1e-2)}),
    Case("foreach", {"foreach": True, "beta2_decay": -0.6}, {"weight_decay": 0.05, "d": 1.2}),
]


def make_params(dtype: torch.dtype, seed: int = 0,
                shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def make_grads(step: int, dtype: torch.dtype,
               shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + step)
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    if step % 2:
        grads[2] = None  # torch leaves it alone; so must the server
    return grads


def groups(params: list[torch.Tensor], group2: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"params": params[:3]}, {"params": params[3:], **group2}]


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
        shapes = [tuple(p.shape) for p in params]
        for p, g in zip(params, make_grads(step, dtype, shapes), strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


def same_state_dicts(ours: dict[str, Any], theirs: dict[str, Any], tol: float) -> None:
    """Our state_dict is torch's: the same entries (keys in torch's order, torch's shapes
    and dtypes, ``step`` a tensor of torch's scalar dtype) and groups, values to ``tol``."""
    assert set(ours["state"]) == set(theirs["state"])
    for i, entry in theirs["state"].items():
        assert list(ours["state"][i]) == list(entry), i
        for key, value in entry.items():
            mine = ours["state"][i][key]
            assert isinstance(mine, torch.Tensor), (i, key)
            assert mine.dtype == value.dtype and mine.shape == value.shape, (i, key)
            np.testing.assert_allclose(mine.double().numpy(), value.double().numpy(), rtol=tol,
                                       atol=tol * (float(value.abs().max()) or 1.0))
    assert ours["param_groups"] == theirs["param_groups"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_with_torch(url: str, sid: str, case: Case, dtype: torch.dtype) -> None:
    remote_params, local_params = make_params(dtype), make_params(dtype)
    opt = ac.Adafactor(groups(remote_params, case.group2), server=url, session=sid,
                       **case.options)
    ref = torch.optim.Adafactor(groups(local_params, case.group2), **case.options)
    scheds = [schedule(opt), schedule(ref)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # torch's step tensors (and so ours) follow it
    try:
        for step in range(STEPS):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
            for s in scheds:
                s.step()
            close(remote_params, local_params, f"after step {step + 1}")
        assert opt.last_step is not None and opt.last_step.step == STEPS
        same_state_dicts(opt.state_dict(), ref.state_dict(), TOL[dtype])
        assert opt.state[remote_params[5]]["row_var"].shape == (12, 1)
    finally:
        torch.set_default_dtype(previous)
        opt.close(delete=True)


def test_state_dict_both_ways(url: str, sid: str) -> None:
    dtype = torch.float64
    case = CASES[1]
    remote_params, local_params = make_params(dtype, 3), make_params(dtype, 3)
    opt = ac.Adafactor(groups(remote_params, case.group2), server=url, session=sid,
                       **case.options)
    ref = torch.optim.Adafactor(groups(local_params, case.group2), **case.options)
    try:
        for step in range(8):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        # ours -> torch, and torch -> ours (a new session), mid-run
        theirs_params = [p.detach().clone() for p in remote_params]
        theirs = torch.optim.Adafactor(groups(theirs_params, {}))
        theirs.load_state_dict(opt.state_dict())
        assert theirs.param_groups[1]["eps"] == (None, 1e-2)
        ours_params = [p.detach().clone() for p in local_params]
        ours = ac.Adafactor(groups(ours_params, {}), server=url, session=f"{sid}-loaded")
        try:
            ours.load_state_dict(ref.state_dict())
            info = ours.describe()
            assert info.step == 8
            assert info.groups[1]["eps"] == (None, 1e-2) and info.groups[0]["eps"] == (1e-30,
                                                                                       1e-3)
            for step in range(8, 16):
                step_both([(remote_params, opt), (local_params, ref),
                           (theirs_params, theirs), (ours_params, ours)], step, dtype)
            close(theirs_params, local_params, "torch, from our state_dict")
            close(ours_params, local_params, "ours, from torch's state_dict")
            same_state_dicts(ours.state_dict(), ref.state_dict(), 1e-12)
        finally:
            ours.close(delete=True)
    finally:
        opt.close(delete=True)


def test_eps1_none_travels_as_unset(url: str, sid: str) -> None:
    """eps=(None, eps2): the server's eps1 is the dtype's epsilon; a number and back."""
    params = make_params(torch.float32, 4)
    local = make_params(torch.float32, 4)
    opt = ac.Adafactor(params, server=url, session=sid)
    ref = torch.optim.Adafactor(local)
    try:
        assert opt.describe().groups[0]["eps"] == (None, 1e-3)
        for step in range(6):
            if step == 2:
                for o in (opt, ref):
                    o.param_groups[0]["eps"] = (1e-3, 1e-3)  # large enough to matter
            if step == 4:
                for o in (opt, ref):
                    o.param_groups[0]["eps"] = (None, 1e-3)
            grads = [torch.full(s, 1e-4) for s in SHAPES]
            for ps, o in ((params, opt), (local, ref)):
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g.clone()
                o.step()
            if step == 2:
                assert opt.describe().groups[0]["eps"] == (1e-3, 1e-3)
            close(params, local, f"after step {step + 1}")
        assert opt.describe().groups[0]["eps"] == (None, 1e-3)
    finally:
        opt.close(delete=True)


def test_checkpoint_restore_and_attach(url: str, sid: str) -> None:
    dtype = torch.float64
    remote_params, local_params = make_params(dtype, 5), make_params(dtype, 5)
    opt = ac.Adafactor(remote_params, lr=0.02, weight_decay=0.01, server=url, session=sid)
    ref = torch.optim.Adafactor(local_params, lr=0.02, weight_decay=0.01)
    try:
        for step in range(0, 8, 2):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        saved = opt.state_dict()
        opt.checkpoint()
        for step in range(8, 12, 2):
            step_both([(remote_params, opt)], step, dtype)
        assert opt.restore_checkpoint() == 4
        close(remote_params, local_params, "after the restore")
        same_state_dicts(opt.state_dict(), saved, 0.0)
        again = ac.Adafactor(make_params(dtype, 9), lr=0.02, weight_decay=0.01, server=url,
                             session=sid)
        again_params = again.param_groups[0]["params"]
        close(again_params, local_params, "attached: the session's parameters")
        for step in range(8, 12, 2):
            step_both([(again_params, again), (local_params, ref)], step, dtype)
        close(again_params, local_params, "the attached optimizer's steps")
        again.close()
    finally:
        opt.close(delete=True)


def test_the_factored_state_costs_rows_plus_columns(url: str, sid: str) -> None:
    big = [torch.zeros(2000, 500), torch.zeros(3, 100, 50), torch.zeros(300)]
    adam = ac.Adam([torch.zeros_like(p) for p in big], server=url, session=f"{sid}-adam")
    opt = ac.Adafactor(big, server=url, session=sid)
    try:
        numel = sum(p.numel() for p in big)
        statistics = 2000 + 500 + 3 * 100 + 3 * 50 + 300
        # Adam: param, grad and two moments; Adafactor: param, grad and the statistics
        overhead = adam.describe().state_bytes - 4 * numel * 4
        assert opt.describe().state_bytes == 2 * numel * 4 + statistics * 4 + overhead
    finally:
        opt.close(delete=True)
        adam.close(delete=True)


@pytest.mark.parametrize("wire", ["grpc", "http"])
def test_a_sharded_session_keeps_every_tensor_whole(shard_servers: list[Any],
                                                    wire: str) -> None:
    """Alpha and the update clipping are norms over whole tensors: none is cut, however
    small split_elements (the vector would be, for Adam)."""
    dtype = torch.float64
    shapes = [(12, 40), (300,), (2, 3, 4), (1,), (), (20, 15), (50, 6)]
    remote_params, local_params = make_params(dtype, 6, shapes), make_params(dtype, 6, shapes)
    transport = ac.ShardedTransport([ac.connect(s.urls[wire]) for s in shard_servers],
                                    split_elements=8)
    opt = ac.Adafactor(groups(remote_params, {"lr": 3e-3}), weight_decay=0.1, server=transport)
    ref = torch.optim.Adafactor(groups(local_params, {"lr": 3e-3}), weight_decay=0.1)
    try:
        held = [[t.name for t in s.describe(opt.session_id).tensors] for s in transport.shards]
        # every tensor whole (a piece of one would be named "<name>#<start>:<end>:<shape>"),
        # on three shards
        assert sorted(n for names in held for n in names) == sorted(
            p.name for p in opt._params), held
        assert all(held), held
        for step in range(0, 24, 2):  # the even steps: every tensor has a gradient
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        close(remote_params, local_params, "after 12 steps")
        same_state_dicts(opt.state_dict(), ref.state_dict(), 1e-12)
        opt.load_state_dict(ref.state_dict())  # split to the shards again, as it was
        for step in range(24, 28, 2):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        close(remote_params, local_params, "after a state_dict loaded")
    finally:
        opt.close(delete=True)
        transport.close()


def test_shared_memory_steps_match_torch(shm_servers: list[Any], sid: str) -> None:
    """The server reads the gradients in place from the region (Adafactor's passes only
    read them), every step."""
    dtype = torch.float32
    remote_params, local_params = make_params(dtype, 8), make_params(dtype, 8)
    opt = ac.Adafactor(groups(remote_params, {"lr": 3e-3}), server=shm_servers[0].urls["grpc"],
                       session=sid, shared_memory=True)
    ref = torch.optim.Adafactor(groups(local_params, {"lr": 3e-3}))
    try:
        for step in range(0, 20, 2):  # the even steps: every tensor has a gradient
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
            close(remote_params, local_params, f"after step {step // 2 + 1}")
        assert opt._session.region is not None  # the steps went through the region
    finally:
        opt.close(delete=True)


def test_plan_shards_keeps_what_it_is_told_to_whole() -> None:
    specs = [TensorSpec("a", (30, 10)), TensorSpec("v", (1000,)), TensorSpec("b", (10, 70))]

    def cut(plan: Any) -> list[str]:
        return sorted({specs[p.parent].name for shard in plan.shards for p in shard
                       if p.end - p.start < plan.numel(p.parent)})

    assert cut(plan_shards(specs, 3, split_elements=10)) == ["b", "v"]
    kept = plan_shards(specs, 3, split_elements=10, whole=lambda t: len(t.shape) >= 2)
    assert cut(kept) == ["v"] and all(kept.shards)


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"lr": -1.0}, {"beta2_decay": 0.5}, {"eps": (-1.0, 1e-3)}, {"eps": (None, -1e-3)},
    {"d": 0.5}, {"weight_decay": -0.1}, {"lr": torch.tensor([1e-2, 1e-2])},
])
def test_constructor_errors_are_torchs(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adafactor([torch.zeros(2)], **kwargs)
    with pytest.raises(ValueError) as ours:  # before any network call: no server here
        ac.Adafactor([torch.zeros(2)], server="grpc://127.0.0.1:1", **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_a_sparse_gradient_is_torchs_error(url: str, sid: str) -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ac.Adafactor(emb.parameters(), server=url, session=sid)
    try:
        emb(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError, match=r"^Adafactor does not support sparse gradients$"):
            opt.step()
        assert opt.describe().step == 0
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize(("group", "message"), [
    ({"d": 0.5}, r"d: expected a value in \[1, 1e\+06\], got 0.5"),
    ({"beta2_decay": 0.1}, r"beta2_decay: expected a value in \[-1e\+06, 0\]"),
    ({"eps1": -1.0}, "eps1: expected a value >= 0"),
    ({"eps2": None}, "eps2: expected a number, got None"),
    ({"betas": (0.9, 0.99)}, "unknown hyperparameter 'beta1' for adafactor"),
])
def test_bad_hyperparameters_are_named_and_create_nothing(url: str, sid: str,
                                                          group: dict[str, Any],
                                                          message: str) -> None:
    with ac.connect(url) as t:
        with pytest.raises(errors.InvalidArgument, match=message):
            t.create_session(SessionSpec(sid, "adafactor", (TensorSpec("w", (3, 2)),),
                                         groups=(group,)))
        with pytest.raises(errors.NotFound):
            t.describe(sid)


def test_bad_changes_and_state_are_refused_and_change_nothing(url: str, sid: str) -> None:
    params = make_params(torch.float64, 7)
    opt = ac.Adafactor(params, server=url, session=sid)
    try:
        step_both([(params, opt)], 0, torch.float64)
        before = opt.state_dict()
        values = [p.clone() for p in params]
        with pytest.raises(errors.InvalidArgument, match=r"d: expected a value in \[1"):
            opt.transport.set_hyperparameters(opt.session_id, 0, {"d": 0.0})
        with pytest.raises(errors.InvalidArgument, match=r"only betas and eps .* may be a pair"):
            opt.transport.set_hyperparameters(opt.session_id, 0, {"eps": (1e-3, 1e-3, 1.0)})
        # a torch state of the wrong shapes: the client says which and sends nothing
        wrong = opt.state_dict()
        wrong["state"][0]["row_var"] = torch.zeros(5, 1)
        with pytest.raises(ValueError, match=r"row_var has shape \[5, 1\], expected row_var of "
                                             r"a parameter of shape \[7, 5\] to have \[7, 1\]"):
            opt.load_state_dict(wrong)
        wrong = opt.state_dict()
        wrong["state"][1]["row_var"] = torch.zeros(33, 1)
        with pytest.raises(ValueError, match=r"shape \[33\] keeps no row_var \(its state: "
                                             "variance\\)"):
            opt.load_state_dict(wrong)
        # the server checks too (a client that does not)
        sd = opt.transport.export_state(opt.session_id)
        sd["state"][0]["col_var"] = np.zeros((7, 1))
        with pytest.raises(errors.InvalidArgument, match=r"col_var has shape \[7, 1\], "
                                                         r"expected \[1, 5\]"):
            opt.transport.import_state(opt.session_id, sd)
        opt.pull()
        for a, b in zip(params, values, strict=True):
            assert torch.equal(a, b)
        same_state_dicts(opt.state_dict(), before, 0.0)
    finally:
        opt.close(delete=True)


def test_a_step_through_the_raw_transport_changes_only_what_it_sends(url: str,
                                                                     sid: str) -> None:
    """eps1 left out of a raw create is torch's None; one push of ones moves every element
    of the matrix by the same alpha (the factored estimate is exact for a constant g)."""
    with ac.connect(url) as t:
        t.create_session(SessionSpec(sid, "adafactor", (TensorSpec("w", (3, 2)),)),
                         [WireTensor("w", (3, 2), "FP32",
                                     encode(np.full((3, 2), 2.0, np.float32), "FP32"))])
        try:
            info = t.describe(sid)
            assert info.groups[0]["eps"] == (None, 1e-3)
            result = t.step(sid, [WireTensor("w", (3, 2), "FP32",
                                             encode(np.ones((3, 2), np.float32), "FP32"))])
            (out,) = result.params
            got = np.frombuffer(out.data, np.float32)
            # alpha = max(eps2, RMS(p)) * min(lr, 1) = 2 * 0.01; U = 1; RMS(U) = 1 = d
            assert np.allclose(got, 2.0 - 0.02, rtol=0, atol=1e-7)
        finally:
            t.delete_session(sid)


# -- the class -------------------------------------------------------------------------------


def _arguments(cls: type) -> list[tuple[str, Any, Any, type]]:
    return [(p.name, p.kind, p.default, type(p.default))
            for p in inspect.signature(cls).parameters.values() if p.name != "params"]


def test_signature_and_defaults_are_torchs(live: Any) -> None:
    ours, theirs = _arguments(ac.Adafactor), _arguments(torch.optim.Adafactor)
    assert ours[:len(theirs)] == theirs
    assert [a[0] for a in ours[len(theirs):]] == list(OPTIONS)
    for arg, kind, default, _ in ours:
        if arg in OPTIONS:
            assert kind is inspect.Parameter.KEYWORD_ONLY and default is None, arg
        elif arg in ROW.switches:
            assert default is ROW.switch_default(arg), arg
        else:
            assert default is ROW.defaults[arg], arg
    assert {a[0] for a in ours} - set(OPTIONS) == set(ROW.defaults) | ROW.switches
    assert ROW.torch_class == "Adafactor"
    # the groups start as torch's
    theirs_group = torch.optim.Adafactor([torch.zeros(2)]).param_groups[0]
    opt = ac.Adafactor([torch.zeros(2)], server=live.urls["grpc"])
    try:
        assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == {
            k: v for k, v in theirs_group.items() if k != "params"}
    finally:
        opt.close(delete=True)


def test_the_table_and_torch_agree_on_the_state_shapes() -> None:
    for shape in [(7, 5), (2, 3, 4), (33,), (), (1,), (1, 1)]:
        p = torch.zeros(shape, requires_grad=True)
        p.grad = torch.ones(shape)
        opt = torch.optim.Adafactor([p])
        opt.step()
        state = opt.state[p]
        for slot in ("row_var", "col_var", "variance"):
            expected = ROW.slot_shape(slot, shape)
            if expected is None:
                assert slot not in state
            else:
                assert tuple(state[slot].shape) == expected
