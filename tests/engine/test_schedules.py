"""Schedules against torch.optim.lr_scheduler (the oracle), and their dict form.

Torch is driven exactly as in training: record each group's lr (and beta1) BEFORE
``opt.step()``, then ``opt.step(); sched.step()``. Update k must use
``schedule.lr(k, base_lr)``. Torch computes most schedules recursively
(lr_t = lr_{t-1} · ratio); the closed forms agree to a few ulps per step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch.optim import SGD, Adam, Optimizer
from torch.optim import lr_scheduler as tls

from adamserve.engine.schedules import (
    Constant,
    Cosine,
    Exponential,
    InverseSqrt,
    Join,
    Linear,
    OneCycle,
    Schedule,
    ScheduleError,
    Step,
    schedule_from_dict,
    warmup,
)

REL = 1e-12
BASE_LRS = (0.1, 0.003)  # two param groups with different base lrs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _optimizer(base_lrs: Sequence[float], kind: str) -> Optimizer:
    groups: list[dict[str, Any]] = [
        {"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], "lr": lr}
        for lr in base_lrs
    ]
    if kind == "adam":
        return Adam(groups, lr=base_lrs[0], betas=(0.9, 0.999))
    if kind == "sgd_momentum":
        return SGD(groups, lr=base_lrs[0], momentum=0.9)
    return SGD(groups, lr=base_lrs[0])


def _beta1(group: dict[str, Any]) -> float:
    return float(group["betas"][0]) if "betas" in group else float(group.get("momentum", 0.0))


def torch_trace(
    make: Callable[[Optimizer], Any],
    steps: int,
    base_lrs: Sequence[float] = BASE_LRS,
    kind: str = "sgd",
) -> tuple[list[list[float]], list[list[float]]]:
    """Per update t = 0..steps-1 and per group: (lr, beta1) as opt.step() sees them."""
    opt = _optimizer(base_lrs, kind)
    sched = make(opt)
    lrs: list[list[float]] = []
    betas: list[list[float]] = []
    for _ in range(steps):
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        betas.append([_beta1(g) for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs, betas


def assert_matches(
    schedule: Schedule,
    expected: list[list[float]],
    base_values: Sequence[float],
    *,
    what: str = "lr",
) -> None:
    fn = schedule.lr if what == "lr" else schedule.beta1
    for t, row in enumerate(expected):
        for g, (want, base) in enumerate(zip(row, base_values, strict=True)):
            got = fn(t, base)
            assert got == pytest.approx(want, rel=REL, abs=0.0), (
                f"{what} at t={t} group={g}: got {got!r}, torch {want!r}"
            )


# --------------------------------------------------------------------------- vs torch


@pytest.mark.parametrize(
    ("start", "end", "total", "steps"),
    [(0.1, 1.0, 37, 120), (1.0, 0.05, 80, 130), (1.0 / 3, 1.0, 5, 100)],
)
def test_linear_matches_linear_lr(start: float, end: float, total: int, steps: int) -> None:
    lrs, _ = torch_trace(
        lambda o: tls.LinearLR(o, start_factor=start, end_factor=end, total_iters=total), steps
    )
    assert_matches(Linear(start, end, total), lrs, BASE_LRS)


@pytest.mark.parametrize(("total", "eta_min"), [(100, 0.0), (150, 1e-4), (7, 0.0)])
def test_cosine_matches_cosine_annealing_lr(total: int, eta_min: float) -> None:
    # Only up to t = T: beyond it torch rises again, we hold eta_min (see below).
    lrs, _ = torch_trace(
        lambda o: tls.CosineAnnealingLR(o, T_max=total, eta_min=eta_min), total + 1
    )
    assert_matches(Cosine(total, eta_min), lrs, BASE_LRS)


def test_cosine_holds_minimum_after_total_steps() -> None:
    schedule = Cosine(10, eta_min=1e-5)
    assert [schedule.lr(t, 0.1) for t in (10, 11, 15, 20, 10_000)] == [1e-5] * 5
    assert schedule.lr(9, 0.1) > 1e-5


@pytest.mark.parametrize("gamma", [0.97, 0.5, 1.0])
def test_exponential_matches_exponential_lr(gamma: float) -> None:
    lrs, _ = torch_trace(lambda o: tls.ExponentialLR(o, gamma=gamma), 150)
    assert_matches(Exponential(gamma), lrs, BASE_LRS)


@pytest.mark.parametrize(("step_size", "gamma"), [(7, 0.5), (1, 0.9), (30, 0.1)])
def test_step_matches_step_lr(step_size: int, gamma: float) -> None:
    lrs, _ = torch_trace(lambda o: tls.StepLR(o, step_size=step_size, gamma=gamma), 120)
    assert_matches(Step(step_size, gamma), lrs, BASE_LRS)


ONE_CYCLE_CASES = [
    pytest.param(strategy, three, pct, div, final, id=f"{strategy}-3p{three}-pct{pct}")
    for strategy in ("cos", "linear")
    for three in (False, True)
    for pct, div, final in ((0.3, 25.0, 1e4), (0.25, 10.0, 100.0))
]


@pytest.mark.parametrize(("strategy", "three", "pct", "div", "final"), ONE_CYCLE_CASES)
@pytest.mark.parametrize("kind", ["adam", "sgd_momentum"])
def test_one_cycle_matches_one_cycle_lr(
    strategy: str, three: bool, pct: float, div: float, final: float, kind: str
) -> None:
    total = 137
    lrs, betas = torch_trace(
        lambda o: tls.OneCycleLR(
            o,
            max_lr=list(BASE_LRS),  # max_lr=None: the group's base lr is its max lr
            total_steps=total,
            pct_start=pct,
            anneal_strategy=strategy,  # type: ignore[arg-type]
            div_factor=div,
            final_div_factor=final,
            three_phase=three,
            base_momentum=0.8,
            max_momentum=0.97,
        ),
        total,
        kind=kind,
    )
    schedule = OneCycle(
        total,
        pct_start=pct,
        anneal_strategy=strategy,  # type: ignore[arg-type]
        div_factor=div,
        final_div_factor=final,
        three_phase=three,
        base_momentum=0.8,
        max_momentum=0.97,
    )
    assert_matches(schedule, lrs, BASE_LRS)
    assert_matches(schedule, betas, [0.9, 0.9], what="beta1")


def test_one_cycle_explicit_max_lr_and_no_momentum_cycling() -> None:
    total = 100
    lrs, betas = torch_trace(
        lambda o: tls.OneCycleLR(o, max_lr=0.5, total_steps=total, cycle_momentum=False),
        total,
        kind="adam",
    )
    schedule = OneCycle(total, max_lr=0.5, cycle_momentum=False)
    assert_matches(schedule, lrs, BASE_LRS)  # base lrs are ignored: max_lr is explicit
    assert_matches(schedule, betas, [0.9, 0.9], what="beta1")  # betas untouched


def test_one_cycle_holds_final_values_after_total_steps() -> None:
    # torch raises past T (and at t = T its "linear" lr already overshoots below min).
    for strategy in ("cos", "linear"):
        schedule = OneCycle(50, anneal_strategy=strategy)
        final_lr = 0.1 / 25.0 / 1e4
        for t in (49, 50, 51, 1000):
            assert schedule.lr(t, 0.1) == pytest.approx(final_lr, rel=REL)
            assert schedule.beta1(t, 0.9) == pytest.approx(0.95, rel=REL)


def test_join_linear_then_cosine_matches_sequential_lr() -> None:
    def make(o: Optimizer) -> tls.SequentialLR:
        return tls.SequentialLR(
            o,
            [
                tls.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=20),
                tls.CosineAnnealingLR(o, T_max=100),
            ],
            milestones=[20],
        )

    lrs, _ = torch_trace(make, 121)  # up to the cosine's T: torch rises after it
    schedule = Join((Linear(0.1, 1.0, 20), Cosine(100)), (20,))
    assert schedule == warmup(20, Cosine(100), start_factor=0.1)
    assert_matches(schedule, lrs, BASE_LRS)


def test_join_linear_then_exponential_matches_sequential_lr() -> None:
    def make(o: Optimizer) -> tls.SequentialLR:
        return tls.SequentialLR(
            o,
            [tls.LinearLR(o, start_factor=0.25, total_iters=10), tls.ExponentialLR(o, gamma=0.95)],
            milestones=[10],
        )

    lrs, _ = torch_trace(make, 150)
    assert_matches(Join((Linear(0.25, 1.0, 10), Exponential(0.95)), (10,)), lrs, BASE_LRS)


def test_join_three_pieces_matches_sequential_lr() -> None:
    def make(o: Optimizer) -> tls.SequentialLR:
        return tls.SequentialLR(
            o,
            [
                tls.LinearLR(o, start_factor=0.5, total_iters=8),
                tls.StepLR(o, step_size=10, gamma=0.5),
                tls.CosineAnnealingLR(o, T_max=60, eta_min=1e-4),
            ],
            milestones=[15, 50],
        )

    lrs, _ = torch_trace(make, 111)
    schedule = Join((Linear(0.5, 1.0, 8), Step(10, 0.5), Cosine(60, 1e-4)), (15, 50))
    assert_matches(schedule, lrs, BASE_LRS)


def test_warmup_then_inverse_sqrt_matches_lambda_lr() -> None:
    w = 16

    def factor(t: int) -> float:
        return t / w if t < w else math.sqrt(w / t)

    lrs, _ = torch_trace(lambda o: tls.LambdaLR(o, factor), 200)
    schedule = warmup(w, InverseSqrt(w))
    assert schedule == Join((Linear(0.0, 1.0, w), InverseSqrt(w)), (w,))
    assert schedule.lr(0, 0.1) == 0.0
    assert schedule.lr(w, 0.1) == 0.1
    assert_matches(schedule, lrs, BASE_LRS)


def test_constant() -> None:
    assert Constant().lr(5, 0.1) == 0.1
    assert Constant(0.5).lr(0, 0.1) == 0.05
    assert Constant().beta1(3, 0.9) == 0.9


def test_join_delegates_beta1_with_local_steps() -> None:
    cycle = OneCycle(40)
    schedule = warmup(10, cycle)
    assert [schedule.beta1(t, 0.9) for t in range(10)] == [0.9] * 10
    for t in range(10, 60):
        assert schedule.beta1(t, 0.9) == cycle.beta1(t - 10, 0.9)
        assert schedule.lr(t, 0.1) == cycle.lr(t - 10, 0.1)


def test_nested_join() -> None:
    inner = Join((Constant(0.5), Exponential(0.9)), (5,))
    schedule = Join((Linear(0.0, 1.0, 3), inner), (3,))
    assert schedule.lr(2, 1.0) == pytest.approx(2 / 3)
    assert schedule.lr(3, 1.0) == 0.5
    assert schedule.lr(7, 1.0) == 0.5
    assert schedule.lr(8, 1.0) == 1.0
    assert schedule.lr(10, 1.0) == pytest.approx(0.81, rel=REL)


def test_negative_step_is_rejected() -> None:
    for schedule in (Constant(), Linear(0.0, 1.0, 3), OneCycle(10), warmup(3, Cosine(5))):
        with pytest.raises(ValueError, match="step"):
            schedule.lr(-1, 0.1)


# --------------------------------------------------------------------------- dict form

ALL_KINDS: list[Schedule] = [
    Constant(),
    Constant(0.25),
    Linear(0.0, 1.0, 100),
    Cosine(1000, eta_min=1e-6),
    InverseSqrt(4000),
    Exponential(0.999),
    Step(30, 0.1),
    OneCycle(500),
    OneCycle(
        200,
        max_lr=0.01,
        pct_start=0.25,
        anneal_strategy="linear",
        div_factor=10.0,
        final_div_factor=100.0,
        three_phase=True,
        cycle_momentum=False,
        base_momentum=0.8,
        max_momentum=0.9,
    ),
    warmup(100, Cosine(900)),
    Join(
        (Linear(0.1, 1.0, 10), Join((Step(5, 0.5), InverseSqrt(10)), (20,)), OneCycle(50)),
        (10, 100),
    ),
]


@pytest.mark.parametrize("schedule", ALL_KINDS, ids=lambda s: s.to_dict()["kind"])
def test_round_trip(schedule: Schedule) -> None:
    d = schedule.to_dict()
    assert schedule_from_dict(d) == schedule
    assert schedule_from_dict(json.loads(json.dumps(d))) == schedule
    hash(schedule)


def test_defaults_may_be_omitted_and_ints_become_floats() -> None:
    assert schedule_from_dict({"kind": "constant"}) == Constant()
    assert schedule_from_dict({"kind": "cosine", "total_steps": 10}) == Cosine(10)
    assert schedule_from_dict({"kind": "one_cycle", "total_steps": 10}) == OneCycle(10)
    linear = schedule_from_dict(
        {"kind": "linear", "start_factor": 0, "end_factor": 1, "total_steps": 4}
    )
    assert linear.to_dict() == {
        "kind": "linear",
        "start_factor": 0.0,
        "end_factor": 1.0,
        "total_steps": 4,
    }
    assert isinstance(linear.to_dict()["start_factor"], float)


def test_to_dict_examples() -> None:
    assert warmup(10, Cosine(90)).to_dict() == {
        "kind": "join",
        "schedules": [
            {"kind": "linear", "start_factor": 0.0, "end_factor": 1.0, "total_steps": 10},
            {"kind": "cosine", "total_steps": 90, "eta_min": 0.0},
        ],
        "milestones": [10],
    }
    assert OneCycle(100).to_dict() == {
        "kind": "one_cycle",
        "total_steps": 100,
        "max_lr": None,
        "pct_start": 0.3,
        "anneal_strategy": "cos",
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "three_phase": False,
        "cycle_momentum": True,
        "base_momentum": 0.85,
        "max_momentum": 0.95,
    }


LIN = {"kind": "linear", "start_factor": 0.1, "end_factor": 1.0, "total_steps": 10}

BAD_DICTS: list[tuple[Any, str]] = [
    ([1, 2], "schedule: expected a mapping"),
    ({"total_steps": 3}, "schedule.kind: missing"),
    ({"kind": "polynomial"}, "schedule.kind: expected one of 'constant'"),
    ({"kind": 3}, "schedule.kind: expected one of"),
    ({"kind": "linear", "start_factor": 0.1, "end_factor": 1.0}, "schedule.total_steps: missing"),
    ({**LIN, "warmup": 3}, "schedule.warmup: unknown key for kind 'linear'"),
    ({**LIN, "total_steps": 0}, "schedule.total_steps: expected an integer >= 1, got 0"),
    ({**LIN, "total_steps": 2.5}, "schedule.total_steps: expected an integer >= 1, got 2.5"),
    ({**LIN, "total_steps": True}, "schedule.total_steps: expected an integer >= 1, got True"),
    ({**LIN, "total_steps": "10"}, "schedule.total_steps: expected an integer >= 1, got '10'"),
    ({**LIN, "start_factor": -0.1}, "schedule.start_factor: expected a finite number >= 0"),
    ({**LIN, "end_factor": float("nan")}, "schedule.end_factor: expected a finite number"),
    ({**LIN, "end_factor": None}, "schedule.end_factor: expected a finite number"),
    ({"kind": "constant", "factor": "1"}, "schedule.factor: expected a finite number"),
    ({"kind": "cosine", "total_steps": -5}, "schedule.total_steps: expected an integer >= 1"),
    ({"kind": "cosine", "total_steps": 5, "eta_min": -1}, "schedule.eta_min: expected"),
    ({"kind": "exponential", "gamma": 0.0}, "schedule.gamma: expected a finite number > 0"),
    ({"kind": "exponential"}, "schedule.gamma: missing"),
    ({"kind": "step", "step_size": 0}, "schedule.step_size: expected an integer >= 1"),
    ({"kind": "inverse_sqrt", "warmup_steps": 0}, "schedule.warmup_steps: expected an integer"),
    ({"kind": "one_cycle", "total_steps": 0}, "schedule.total_steps: expected an integer >= 1"),
    ({"kind": "one_cycle", "total_steps": 9, "max_lr": 0}, "schedule.max_lr: expected"),
    ({"kind": "one_cycle", "total_steps": 9, "pct_start": 1.5}, "schedule.pct_start: expected"),
    (
        {"kind": "one_cycle", "total_steps": 10, "pct_start": 0.1},
        "schedule.pct_start: expected a value with pct_start * total_steps != 1",
    ),
    (
        {"kind": "one_cycle", "total_steps": 9, "anneal_strategy": "exp"},
        "schedule.anneal_strategy: expected one of 'cos', 'linear', got 'exp'",
    ),
    (
        {"kind": "one_cycle", "total_steps": 9, "three_phase": 1},
        "schedule.three_phase: expected a boolean, got 1",
    ),
    (
        {"kind": "one_cycle", "total_steps": 9, "base_momentum": 1.0},
        "schedule.base_momentum: expected a finite number >= 0 and < 1",
    ),
    (
        {"kind": "join", "schedules": [LIN, {"kind": "constant"}]},
        "schedule.milestones: missing",
    ),
    (
        {"kind": "join", "schedules": LIN, "milestones": []},
        "schedule.schedules: expected a list of schedules",
    ),
    (
        {"kind": "join", "schedules": [], "milestones": []},
        "schedule.schedules: expected a non-empty sequence",
    ),
    (
        {"kind": "join", "schedules": [LIN, {"kind": "constant"}], "milestones": [5, 6]},
        "schedule.milestones: expected 1 milestone(s), one fewer than the 2 schedule(s)",
    ),
    (
        {"kind": "join", "schedules": [LIN, LIN, LIN], "milestones": [10, 10]},
        "schedule.milestones[1]: expected an integer > milestones[0] = 10 (strictly increasing)",
    ),
    (
        {"kind": "join", "schedules": [LIN, LIN], "milestones": [0]},
        "schedule.milestones[0]: expected an integer >= 1, got 0",
    ),
    (
        {"kind": "join", "schedules": [LIN, LIN], "milestones": [2.0]},
        "schedule.milestones[0]: expected an integer >= 1, got 2.0",
    ),
    (
        {"kind": "join", "schedules": [LIN, LIN], "milestones": "5"},
        "schedule.milestones: expected a sequence of integers",
    ),
    (
        {"kind": "join", "schedules": [LIN, {**LIN, "total_steps": 0}], "milestones": [10]},
        "schedule.schedules[1].total_steps: expected an integer >= 1, got 0",
    ),
    (
        {"kind": "join", "schedules": [LIN, {"kind": "cosin"}], "milestones": [10]},
        "schedule.schedules[1].kind: expected one of",
    ),
    (
        {
            "kind": "join",
            "schedules": [
                LIN,
                {
                    "kind": "join",
                    "schedules": [{"kind": "exponential", "gamma": -1}, LIN],
                    "milestones": [3],
                },
            ],
            "milestones": [10],
        },
        "schedule.schedules[1].schedules[0].gamma: expected a finite number > 0 and <= 1, got -1",
    ),
    (
        {
            "kind": "join",
            "schedules": [LIN, {"kind": "join", "schedules": [LIN, LIN], "milestones": [0]}],
            "milestones": [10],
        },
        "schedule.schedules[1].milestones[0]: expected an integer >= 1",
    ),
]


@pytest.mark.parametrize(("d", "message"), BAD_DICTS)
def test_from_dict_rejects(d: Any, message: str) -> None:
    with pytest.raises(ScheduleError) as info:
        schedule_from_dict(d)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(info.value.field + ": ")


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ScheduleError, match=r"^schedule\.total_steps: expected an integer >= 1"):
        Linear(0.1, 1.0, 0)
    with pytest.raises(ScheduleError, match=r"^schedule\.milestones"):
        Join((Constant(), Constant()), ())
    with pytest.raises(ScheduleError, match=r"^schedule\.schedules\[1\]: expected a schedule"):
        Join((Constant(), "cosine"), (3,))  # type: ignore[arg-type]
    # sequences are stored as tuples, so schedules stay hashable
    join = Join([Constant(), Cosine(5)], [3])  # type: ignore[arg-type]
    assert join.schedules == (Constant(), Cosine(5)) and join.milestones == (3,)
    hash(join)


@pytest.mark.parametrize("kind", ["exponential", "step"])
def test_growing_gamma_is_refused(kind: str) -> None:
    """gamma > 1 would overflow lr to inf within a few thousand steps."""
    d: dict[str, object] = {"kind": kind, "gamma": 1.5}
    if kind == "step":
        d["step_size"] = 10
    with pytest.raises(ScheduleError, match="gamma: expected a finite number > 0 and <= 1"):
        schedule_from_dict(d)
