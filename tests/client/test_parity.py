"""The engine's parity table, end to end through the client, over both transports.

Each case trains the same parameters with ``adamserve_client.X`` (against a real
server, float32 on the wire and in the server's state) and with local
``torch.optim.X`` (LAMB: a float64 NumPy reference of the paper / optax rule) on
the same gradients, and compares after every step. Two parameter groups with
different hyperparameters, and a tensor whose gradient is None every other step
(torch leaves it alone; so must the server).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac

STEPS = 20
ATOL = 1e-6
SHAPES = [(7, 5), (33,), (2, 3, 4), (1,)]


@dataclass(frozen=True)
class Case:
    name: str
    remote: Callable[..., ac.RemoteOptimizer]
    local: Callable[..., torch.optim.Optimizer] | None
    options: dict[str, Any] = field(default_factory=dict)
    group2: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("adam", ac.Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3}),
    Case("adamw", ac.AdamW, torch.optim.AdamW, {"lr": 1e-2}, {"weight_decay": 0.3}),
    Case("amsgrad", ac.Adam, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True},
         {"betas": (0.8, 0.99)}),
    Case("nadam", ac.NAdam, torch.optim.NAdam, {"weight_decay": 0.1}, {"momentum_decay": 1e-2}),
    Case("radam", ac.RAdam, torch.optim.RAdam, {"lr": 1e-2, "betas": (0.9, 0.99)},
         {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    Case("adamax", ac.Adamax, torch.optim.Adamax, {"weight_decay": 0.05}, {"lr": 1e-2}),
    Case("adagrad", ac.Adagrad, torch.optim.Adagrad,
         {"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1}, {"eps": 1e-6}),
    Case("rmsprop", ac.RMSprop, torch.optim.RMSprop,
         {"lr": 1e-3, "momentum": 0.9, "centered": True}, {"alpha": 0.9, "momentum": 0.0}),
    Case("lamb", ac.LAMB, None, {"lr": 1e-2, "weight_decay": 0.01}, {"betas": (0.8, 0.99)}),
]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def make_grads(step: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + step)
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=g) for s in SHAPES]
    if step % 2:
        grads[2] = None  # torch skips a parameter without a gradient
    return grads


def groups(params: list[torch.Tensor], group2: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"params": params[:2]}, {"params": params[2:], **group2}]


class LambReference:
    """LAMB (optax.lamb) in float64 NumPy, per-tensor step counts like the server's."""

    def __init__(self, params: list[torch.Tensor], hyper: list[dict[str, Any]]) -> None:
        self.p = [t.double().numpy().copy() for t in params]
        self.hyper = hyper
        self.m = [np.zeros_like(p) for p in self.p]
        self.v = [np.zeros_like(p) for p in self.p]
        self.t = [0] * len(self.p)

    def step(self, grads: list[torch.Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            h = self.hyper[i]
            b1, b2 = h["betas"]
            gd = g.double().numpy()
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * gd
            self.v[i] = b2 * self.v[i] + (1 - b2) * gd * gd
            mh = self.m[i] / (1 - b1**t)
            vh = self.v[i] / (1 - b2**t)
            r = mh / (np.sqrt(vh) + h["eps"]) + h["weight_decay"] * self.p[i]
            pn, rn = np.linalg.norm(self.p[i]), np.linalg.norm(r)
            phi = pn / rn if pn > 0 and rn > 0 else 1.0
            self.p[i] = self.p[i] - h["lr"] * phi * r


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_with_torch(url: str, sid: str, case: Case) -> None:
    remote_params = make_params()
    opt = case.remote(groups(remote_params, case.group2), server=url, session=sid,
                      **case.options)
    local_params = make_params()
    if case.local is not None:
        ref: Any = case.local(groups(local_params, case.group2), **case.options)
    else:
        defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0,
                    **case.options}
        per_tensor = [defaults] * 2 + [{**defaults, **case.group2}] * 2
        ref = LambReference(local_params, per_tensor)
    try:
        for step in range(STEPS):
            grads = make_grads(step)
            for p, g in zip(remote_params, grads, strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()
            if case.local is not None:
                for p, g in zip(local_params, grads, strict=True):
                    p.grad = None if g is None else g.clone()
                ref.step()
                expected = [p.detach().double().numpy() for p in local_params]
            else:
                ref.step(grads)
                expected = ref.p
            for i, (p, e) in enumerate(zip(remote_params, expected, strict=True)):
                np.testing.assert_allclose(
                    p.double().numpy(), e, rtol=0, atol=ATOL if case.local else 1e-5,
                    err_msg=f"{case.name}: tensor {i} after step {step + 1}")
        assert opt.last_step is not None and opt.last_step.step == STEPS
    finally:
        opt.close(delete=True)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-4),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05,
                                                              total_steps=STEPS),
    "linear": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=15)], milestones=[5]),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_torch_lr_schedulers(url: str, sid: str, kind: str) -> None:
    """Schedulers write param_groups[g]['lr'] (OneCycle also 'betas') before each step;
    the client sends the change, so the server's trajectory is torch's."""
    remote_params = make_params(1)
    local_params = make_params(1)
    opt = ac.AdamW(groups(remote_params, {"lr": 5e-3}), lr=1e-2, server=url, session=sid)
    ref = torch.optim.AdamW(groups(local_params, {"lr": 5e-3}), lr=1e-2)
    sched, ref_sched = SCHEDULERS[kind](opt), SCHEDULERS[kind](ref)
    betas_seen = set()
    try:
        for step in range(STEPS):
            for ps, o in ((remote_params, opt), (local_params, ref)):
                o.zero_grad()
                for p, g in zip(ps, make_grads(step), strict=True):
                    p.grad = g
                o.step()
            lr_used, beta1_used = ref.param_groups[0]["lr"], ref.param_groups[0]["betas"][0]
            sched.step()
            ref_sched.step()
            betas_seen.add(opt.param_groups[0]["betas"][0])
            for a, b in zip(remote_params, local_params, strict=True):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=ATOL)
        # describe() shows the scheduler's newest values, which the next step will use,
        # not those of the last step
        lr_next, beta1_next = ref.param_groups[0]["lr"], ref.param_groups[0]["betas"][0]
        assert kind == "linear" or lr_next != lr_used  # linear ends flat at step 10
        info = opt.describe()
        assert math.isclose(info.lr[0], lr_next, rel_tol=1e-12)
        if kind == "onecycle":
            assert len(betas_seen) > 5  # momentum cycled, and was sent
            assert beta1_next != beta1_used
            assert math.isclose(info.groups[0]["betas"][0],  # type: ignore[index]
                                beta1_next, rel_tol=1e-12)
    finally:
        opt.close(delete=True)


def test_hyperparameter_changes_send_only_the_diff(url: str, sid: str) -> None:
    params = make_params()
    opt = ac.Adam(groups(params, {}), server=url, session=sid)
    sent: list[tuple[int, dict[str, Any]]] = []
    real = opt.transport.set_hyperparameters

    def spy(session_id: str, group: int, changes: Any) -> Any:
        sent.append((group, dict(changes)))
        return real(session_id, group, changes)

    opt.transport.set_hyperparameters = spy  # type: ignore[method-assign]
    try:
        for p, g in zip(params, make_grads(0), strict=True):
            p.grad = g
        opt.step()
        assert sent == []
        opt.param_groups[1]["lr"] = 0.5
        opt.param_groups[1]["my_tag"] = "not a hyperparameter"  # torch allows any key
        opt.step()
        opt.step()
        assert sent == [(1, {"lr": 0.5})]
        opt.param_groups[0]["betas"] = (0.5, 0.999)
        opt.param_groups[0]["weight_decay"] = 0.25
        opt.step()
        assert sent[1:] == [(0, {"betas": (0.5, 0.999), "weight_decay": 0.25})]
        info = opt.describe()
        assert info.groups[0]["betas"] == (0.5, 0.999) and info.groups[1]["lr"] == 0.5
    finally:
        opt.close(delete=True)


def test_clip_grad_norm_and_closure(url: str, sid: str) -> None:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = ac.AdamW(model.parameters(), lr=1e-2, server=url, session=sid)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    try:
        for _ in range(10):
            losses = []
            for m, o in ((model, opt), (twin, ref)):
                def closure(m: torch.nn.Module = m, o: Any = o) -> torch.Tensor:
                    o.zero_grad()
                    loss = torch.nn.functional.mse_loss(m(x), y)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
                    return loss

                losses.append(o.step(closure).item())
            assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=ATOL)
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_16_bit_wire_stays_close(url: str, sid: str, wire: str) -> None:
    remote_params = make_params(2)
    local_params = make_params(2)
    opt = ac.AdamW(remote_params, lr=1e-2, server=url, session=sid, wire_dtype=wire)
    ref = torch.optim.AdamW(local_params, lr=1e-2)
    try:
        for step in range(STEPS):
            for ps, o in ((remote_params, opt), (local_params, ref)):
                for p, g in zip(ps, make_grads(step), strict=True):
                    p.grad = g
                o.step()
        for a, b in zip(remote_params, local_params, strict=True):
            # what came back is 16-bit, widened
            half = torch.bfloat16 if wire == "bfloat16" else torch.float16
            torch.testing.assert_close(a, a.to(half).float(), rtol=0, atol=0)
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-2, atol=1e-2)
        opt.pull()  # the server's float32 master weights are closer still
        for a, b in zip(remote_params, local_params, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=2e-3)
    finally:
        opt.close(delete=True)


def test_large_tensor_is_chunked(url: str, sid: str) -> None:
    """A 5 MiB tensor spans several 4 MiB gRPC messages each way."""
    n = 1_300_000
    g = torch.Generator().manual_seed(5)
    p = torch.randn(n, generator=g)
    q = p.clone()
    opt = ac.Adam([p], lr=1e-2, server=url, session=sid)
    ref = torch.optim.Adam([q], lr=1e-2)
    try:
        for _ in range(2):
            grad = torch.randn(n, generator=g)
            p.grad, q.grad = grad, grad.clone()
            opt.step()
            ref.step()
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=0, atol=ATOL)
    finally:
        opt.close(delete=True)
