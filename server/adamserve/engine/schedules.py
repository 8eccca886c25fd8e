"""Learning-rate schedules: step -> lr, in closed form.

A schedule maps the session's step count ``t`` (0 for the first update, as torch's
schedulers and optax do) and a group's base lr to the lr of that update. Torch's
loop ``opt.step(); sched.step()`` uses, for its k-th update (k = 0, 1, ...), the lr
that ``schedule.lr(k, base_lr)`` returns here.

Every schedule is a frozen dataclass, validated on construction, computed in
closed form (no recursion over steps) in float64 Python floats, and serialisable
with :meth:`to_dict` / :func:`schedule_from_dict`. Where torch computes a schedule
recursively (``lr_t = lr_{t-1} · ratio``) the closed form here agrees with it to
within a few ulps per step.

Kinds (``T``: total_steps, ``t``: step, ``base``: the group's base lr):

* ``constant``      base · factor
* ``linear``        base · (start + (end - start) · min(t, T) / T)          (LinearLR)
* ``cosine``        eta_min + (base - eta_min) · (1 + cos(π t / T)) / 2,
                    held at eta_min for t >= T                         (CosineAnnealingLR)
* ``inverse_sqrt``  base · sqrt(W / (t + W))
* ``exponential``   base · γ^t                                               (ExponentialLR)
* ``step``          base · γ^(t // step_size)                                (StepLR)
* ``one_cycle``     torch's OneCycleLR, lr and momentum (beta1)               (OneCycleLR)
* ``join``          piece i for milestones[i-1] <= t < milestones[i]          (SequentialLR)

A warmup is a join: ``warmup(W, then)`` = ``Join((Linear(0, 1, W), then), (W,))``.

Bounds, so that no schedule's arithmetic can overflow (a float of a huge int, a product
past float32's range) for any step a session can reach: step counts (``total_steps``,
``warmup_steps``, ``step_size``, milestones) are integers in [1, :data:`MAX_STEPS`];
every other number is finite and at most :data:`~adamserve.engine.algorithms.MAX_VALUE`
(1e6), divisors (``div_factor``, ``final_div_factor``) at least its inverse.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, Protocol

from adamserve.engine.algorithms import MAX_VALUE
from adamserve.errors import shown

__all__ = [
    "MAX_STEPS",
    "Constant",
    "Cosine",
    "Exponential",
    "InverseSqrt",
    "Join",
    "Linear",
    "OneCycle",
    "Schedule",
    "ScheduleError",
    "Step",
    "schedule_from_dict",
    "warmup",
]


class Schedule(Protocol):
    def lr(self, step: int, base_lr: float) -> float: ...

    def beta1(self, step: int, base_beta1: float) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


class ScheduleError(ValueError):
    """An invalid schedule. ``field`` is the path of the offending value
    (``schedule.schedules[1].total_steps``); the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


# --------------------------------------------------------------------------- checks

_ROOT = "schedule"

MAX_STEPS = 10**12  # the longest schedule (and latest milestone): exact in a float64
_MIN_DIVISOR = 1 / MAX_VALUE


def _bad(name: str, expected: str, value: object) -> ScheduleError:
    return ScheduleError(f"{_ROOT}.{name}", f"expected {expected}, got {shown(value)}")


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _bad(name, f"an integer >= {minimum}", value)
    if int(value) > MAX_STEPS:
        raise _bad(name, f"an integer in [{minimum}, {MAX_STEPS}]", value)
    return int(value)


def _num(
    name: str,
    value: object,
    *,
    lo: float | None = None,
    lo_open: bool = False,
    hi: float = MAX_VALUE,
    hi_open: bool = False,
) -> float:
    """A finite real number (bools refused) within the given bounds (at most
    ``MAX_VALUE`` unless told), as a float."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    expected = "a finite number " + " and ".join(parts)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, expected, value)
    x = float(value)
    ok = math.isfinite(x)
    if ok and lo is not None:
        ok = x > lo if lo_open else x >= lo
    if ok:
        ok = x < hi if hi_open else x <= hi
    if not ok:
        raise _bad(name, expected, value)
    return x


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "a boolean", value)
    return value


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {shown(step)}")


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Constant:
    """lr = base_lr · factor."""

    factor: float = 1.0

    def __post_init__(self) -> None:
        _set(self, "factor", _num("factor", self.factor, lo=0.0))

    def lr(self, step: int, base_lr: float) -> float:
        _check_step(step)
        return base_lr * self.factor

    def beta1(self, step: int, base_beta1: float) -> float:
        return base_beta1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "constant", "factor": self.factor}


@dataclass(frozen=True)
class Linear:
    """torch ``LinearLR`` in closed form::

        lr(t) = base_lr · (start_factor + (end_factor - start_factor) · min(t, T) / T)

    with ``T = total_steps``. A linear warmup over W steps is ``Linear(s, 1.0, W)``
    (torch requires 0 < start_factor <= 1 and end_factor <= 1; here any factor >= 0
    is allowed, so a warmup may start from 0 as optax's does).
    """

    start_factor: float
    end_factor: float
    total_steps: int

    def __post_init__(self) -> None:
        _set(self, "start_factor", _num("start_factor", self.start_factor, lo=0.0))
        _set(self, "end_factor", _num("end_factor", self.end_factor, lo=0.0))
        _set(self, "total_steps", _int("total_steps", self.total_steps, 1))

    def lr(self, step: int, base_lr: float) -> float:
        _check_step(step)
        s, e, T = self.start_factor, self.end_factor, self.total_steps
        return base_lr * (s + (e - s) * min(T, step) / T)

    def beta1(self, step: int, base_beta1: float) -> float:
        return base_beta1

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "linear",
            "start_factor": self.start_factor,
            "end_factor": self.end_factor,
            "total_steps": self.total_steps,
        }


@dataclass(frozen=True)
class Cosine:
    """torch ``CosineAnnealingLR`` in closed form::

        lr(t) = eta_min + (base_lr - eta_min) · (1 + cos(π · t / T)) / 2   for t < T
        lr(t) = eta_min                                                  for t >= T

    with ``T = total_steps``; ``eta_min`` is an absolute lr, as in torch. Past T
    torch's scheduler rises again (it is periodic with period 2T); this schedule
    holds the minimum instead, as optax's ``cosine_decay_schedule`` does.
    """

    total_steps: int
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "total_steps", _int("total_steps", self.total_steps, 1))
        _set(self, "eta_min", _num("eta_min", self.eta_min, lo=0.0))

    def lr(self, step: int, base_lr: float) -> float:
        _check_step(step)
        if step >= self.total_steps:
            return self.eta_min
        eta_min = self.eta_min
        return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * step / self.total_steps)) / 2

    def beta1(self, step: int, base_beta1: float) -> float:
        return base_beta1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cosine", "total_steps": self.total_steps, "eta_min": self.eta_min}


@dataclass(frozen=True)
class InverseSqrt:
    """Inverse square-root decay::

        lr(t) = base_lr · sqrt(W / (t + W)),   W = warmup_steps

    so lr(0) = base_lr. As the piece after a W-step linear warmup in a :class:`Join`
    (local step t - W) it gives ``base_lr · sqrt(W / t)`` in the global step t,
    the "Noam" / T5 shape.
    """

    warmup_steps: int

    def __post_init__(self) -> None:
        _set(self, "warmup_steps", _int("warmup_steps", self.warmup_steps, 1))

    def lr(self, step: int, base_lr: float) -> float:
        _check_step(step)
        w = self.warmup_steps
        return base_lr * math.sqrt(w / (step + w))

    def beta1(self, step: int, base_beta1: float) -> float:
        return base_beta1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "inverse_sqrt", "warmup_steps": self.warmup_steps}


@dataclass(frozen=True)
class Exponential:
    """torch ``ExponentialLR`` in closed form: lr(t) = base_lr · gamma^t, 0 < gamma <= 1
    (a growing lr would overflow within a few thousand steps)."""

    gamma: float

    def __post_init__(self) -> None:
        _set(self, "gamma", _num("gamma", self.gamma, lo=0.0, lo_open=True, hi=1.0))

    def lr(self, step: int, base_lr: float) -> float:
        _check_step(step)
        return base_lr * self.gamma**step

    def beta1(self, step: int, base_beta1: float) -> float:
        return base_beta1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "exponential", "gamma": self.gamma}


@dataclass(frozen=True)
class Step:
    """torch ``StepLR`` in closed form: lr(t) = base_lr · gamma^(t // step_size)."""

    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _set(self, "step_size", _int("step_size", self.step_size, 1))
        _set(self, "gamma", _num("gamma", self.gamma, lo=0.0, lo_open=True, hi=1.0))

    def lr(self, step: int, base_lr: float) -> float:
        _check_step(step)
        return base_lr * self.gamma ** (step // self.step_size)

    def beta1(self, step: int, base_beta1: float) -> float:
        return base_beta1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "step", "step_size": self.step_size, "gamma": self.gamma}


_AnnealStrategy = Literal["cos", "linear"]
# (end_step, start_lr, end_lr, start_momentum, end_momentum); the names index
# _OneCycleValues below, mirroring the keys torch's OneCycleLR stores in each group.
_Phase = tuple[float, str, str, str, str]


@dataclass(frozen=True)
class OneCycle:
    """torch ``OneCycleLR`` (the 1cycle policy), lr and momentum, step for step.

    With ``max = max_lr`` (or the group's base lr when ``max_lr`` is None),
    ``initial = max / div_factor`` and ``min = initial / final_div_factor``, and
    ``T = total_steps``, ``p = pct_start``, the phases are (torch's arithmetic)::

        two phases:    [0,        p·T - 1]  initial -> max    momentum max_m -> base_m
                       (p·T - 1,  T - 1  ]  max     -> min    momentum base_m -> max_m
        three phases:  [0,        p·T - 1]  initial -> max    momentum max_m -> base_m
                       (p·T - 1, 2p·T - 2]  max     -> initial momentum base_m -> max_m
                       (2p·T - 2, T - 1  ]  initial -> min    momentum max_m -> max_m

    Within a phase ``[s, e]``, ``pct = (t - s) / (e - s)`` (s = 0.0 for the first)
    and the value is ``end + (start - end) / 2 · (cos(π·pct) + 1)`` ("cos") or
    ``(end - start) · pct + start`` ("linear").

    ``beta1`` returns the cycled momentum when ``cycle_momentum`` (torch sets
    ``betas[0]`` for Adam-like optimizers and ``momentum`` for SGD), else the
    group's own beta1. For t >= T torch raises (at t = T its formula already
    overshoots, for "linear" possibly to a negative lr); this schedule holds its
    final value, lr(T - 1) = min and momentum max_m.
    """

    total_steps: int
    max_lr: float | None = None
    pct_start: float = 0.3
    anneal_strategy: _AnnealStrategy = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self) -> None:
        total = _int("total_steps", self.total_steps, 1)
        _set(self, "total_steps", total)
        if self.max_lr is not None:
            _set(self, "max_lr", _num("max_lr", self.max_lr, lo=0.0, lo_open=True))
        pct = _num("pct_start", self.pct_start, lo=0.0, hi=1.0)
        _set(self, "pct_start", pct)
        if self.anneal_strategy not in ("cos", "linear"):
            raise _bad("anneal_strategy", "one of 'cos', 'linear'", self.anneal_strategy)
        # divisors of max_lr: bounded below too, so max_lr / div / final stays finite
        for name in ("div_factor", "final_div_factor"):
            _set(self, name, _num(name, getattr(self, name), lo=_MIN_DIVISOR))
        _set(self, "three_phase", _bool("three_phase", self.three_phase))
        _set(self, "cycle_momentum", _bool("cycle_momentum", self.cycle_momentum))
        for name in ("base_momentum", "max_momentum"):
            _set(self, name, _num(name, getattr(self, name), lo=0.0, hi=1.0, hi_open=True))
        # The first phase ends at step p·T - 1; if that is exactly 0 torch divides
        # 0 by 0 at step 0. Every other zero-width phase is never reached for t < T.
        if float(pct * total) - 1 == 0:
            raise _bad(
                "pct_start",
                f"a value with pct_start * total_steps != 1 (total_steps={total})",
                self.pct_start,
            )

    def _phases(self) -> tuple[_Phase, ...]:
        pct, total = self.pct_start, self.total_steps
        if self.three_phase:
            return (
                (float(pct * total) - 1, "initial", "max", "max_m", "base_m"),
                (float(2 * pct * total) - 2, "max", "initial", "base_m", "max_m"),
                (total - 1, "initial", "min", "max_m", "max_m"),
            )
        return (
            (float(pct * total) - 1, "initial", "max", "max_m", "base_m"),
            (total - 1, "max", "min", "base_m", "max_m"),
        )

    def _locate(self, step: int) -> tuple[_Phase, float]:
        """The phase of ``step`` and the fraction ``pct`` through it (torch's loop)."""
        _check_step(step)
        step = min(step, self.total_steps - 1)
        phases = self._phases()
        start_step = 0.0
        for i, phase in enumerate(phases):
            end_step = phase[0]
            if step <= end_step or i == len(phases) - 1:
                return phase, (step - start_step) / (end_step - start_step)
            start_step = end_step
        raise AssertionError("unreachable")  # pragma: no cover

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def lr(self, step: int, base_lr: float) -> float:
        phase, pct = self._locate(step)
        max_lr = base_lr if self.max_lr is None else self.max_lr
        initial = max_lr / self.div_factor
        values = {"initial": initial, "max": max_lr, "min": initial / self.final_div_factor}
        return self._anneal(values[phase[1]], values[phase[2]], pct)

    def beta1(self, step: int, base_beta1: float) -> float:
        if not self.cycle_momentum:
            return base_beta1
        phase, pct = self._locate(step)
        values = {"base_m": self.base_momentum, "max_m": self.max_momentum}
        return self._anneal(values[phase[3]], values[phase[4]], pct)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "one_cycle",
            "total_steps": self.total_steps,
            "max_lr": self.max_lr,
            "pct_start": self.pct_start,
            "anneal_strategy": self.anneal_strategy,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "three_phase": self.three_phase,
            "cycle_momentum": self.cycle_momentum,
            "base_momentum": self.base_momentum,
            "max_momentum": self.max_momentum,
        }


def _is_schedule(obj: object) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("lr", "beta1", "to_dict"))


@dataclass(frozen=True)
class Join:
    """Pieces run one after another, torch ``SequentialLR`` semantics::

        i = number of milestones <= t
        lr(t) = schedules[i].lr(t - milestones[i-1], base_lr)   (milestones[-1] := 0)

    i.e. piece i is active for milestones[i-1] <= t < milestones[i] and sees its own
    local step, starting at 0. ``beta1`` is delegated the same way. Needs
    ``len(milestones) == len(schedules) - 1`` and 1 <= m0 < m1 < ...
    """

    schedules: tuple[Schedule, ...]
    milestones: tuple[int, ...]

    def __post_init__(self) -> None:
        pieces = self.schedules
        if isinstance(pieces, (str, bytes)) or not isinstance(pieces, Sequence) or not pieces:
            raise _bad("schedules", "a non-empty sequence of schedules", pieces)
        for i, piece in enumerate(pieces):
            if not _is_schedule(piece):
                raise _bad(f"schedules[{i}]", "a schedule", piece)
        _set(self, "schedules", tuple(pieces))
        marks = self.milestones
        if isinstance(marks, (str, bytes)) or not isinstance(marks, Sequence):
            raise _bad("milestones", "a sequence of integers", marks)
        if len(marks) != len(pieces) - 1:
            raise _bad(
                "milestones",
                f"{len(pieces) - 1} milestone(s), one fewer than the {len(pieces)} schedule(s)",
                marks,
            )
        previous = 0
        for i, mark in enumerate(marks):
            if isinstance(mark, bool) or not isinstance(mark, numbers.Integral) or mark <= previous:
                expected = (
                    f"an integer > milestones[{i - 1}] = {previous} (strictly increasing)"
                    if i
                    else "an integer >= 1"
                )
                raise _bad(f"milestones[{i}]", expected, mark)
            if mark > MAX_STEPS:
                raise _bad(f"milestones[{i}]", f"an integer <= {MAX_STEPS}", mark)
            previous = int(mark)
        _set(self, "milestones", tuple(int(m) for m in marks))

    def _locate(self, step: int) -> tuple[Schedule, int]:
        _check_step(step)
        i = bisect_right(self.milestones, step)
        return self.schedules[i], step - self.milestones[i - 1] if i else step

    def lr(self, step: int, base_lr: float) -> float:
        piece, local = self._locate(step)
        return piece.lr(local, base_lr)

    def beta1(self, step: int, base_beta1: float) -> float:
        piece, local = self._locate(step)
        return piece.beta1(local, base_beta1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "join",
            "schedules": [piece.to_dict() for piece in self.schedules],
            "milestones": list(self.milestones),
        }


def warmup(warmup_steps: int, then: Schedule, start_factor: float = 0.0) -> Join:
    """Linear warmup from ``base_lr · start_factor`` to ``base_lr`` over ``warmup_steps``
    updates, then ``then`` (which starts at its own step 0)::

        Join((Linear(start_factor, 1.0, W), then), (W,))

    With the default start_factor 0 the first update has lr 0 (as optax's warmups).
    """
    return Join((Linear(start_factor, 1.0, warmup_steps), then), (warmup_steps,))


# --------------------------------------------------------------------------- dicts

_KINDS: dict[str, type[Any]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "inverse_sqrt": InverseSqrt,
    "exponential": Exponential,
    "step": Step,
    "one_cycle": OneCycle,
    "join": Join,
}


def _rebase(error: ScheduleError, path: str) -> ScheduleError:
    """The same error with its ``schedule`` root replaced by ``path``."""
    field = error.field
    if field == _ROOT or field.startswith(_ROOT + ".") or field.startswith(_ROOT + "["):
        field = path + field[len(_ROOT) :]
    return ScheduleError(field, error.detail)


def _from_dict(d: object, path: str) -> Schedule:
    if not isinstance(d, Mapping):
        raise ScheduleError(path, f"expected a mapping with a 'kind', got {shown(d)}")
    kinds = ", ".join(repr(k) for k in _KINDS)
    if "kind" not in d:
        raise ScheduleError(f"{path}.kind", f"missing; expected one of {kinds}")
    kind = d["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ScheduleError(f"{path}.kind", f"expected one of {kinds}, got {shown(kind)}")
    cls = _KINDS[kind]
    spec = {f.name: f for f in fields(cls)}
    for key in d:
        if key != "kind" and key not in spec:
            allowed = ", ".join(repr(k) for k in spec)
            short = isinstance(key, str) and len(key) <= 64
            raise ScheduleError(
                f"{path}.{key}" if short else f"{path}[{shown(key)}]",
                f"unknown key for kind {kind!r}; allowed: {allowed}",
            )
    kwargs: dict[str, Any] = {}
    for name, f in spec.items():
        if name in d:
            kwargs[name] = d[name]
        elif f.default is MISSING:
            raise ScheduleError(f"{path}.{name}", f"missing (required for kind {kind!r})")
    if cls is Join:
        pieces = kwargs["schedules"]
        if isinstance(pieces, (str, bytes, Mapping)) or not isinstance(pieces, Sequence):
            raise ScheduleError(
                f"{path}.schedules", f"expected a list of schedules, got {shown(pieces)}"
            )
        kwargs["schedules"] = tuple(
            _from_dict(piece, f"{path}.schedules[{i}]") for i, piece in enumerate(pieces)
        )
    try:
        schedule: Schedule = cls(**kwargs)
    except ScheduleError as error:
        raise _rebase(error, path) from None
    return schedule


def schedule_from_dict(d: Mapping[str, Any]) -> Schedule:
    """Build a schedule from its :meth:`to_dict` form, validating strictly.

    Unknown kinds and keys, missing required keys, wrong types and out-of-range
    values raise :class:`ScheduleError` naming the field (``schedule.total_steps``,
    ``schedule.schedules[1].gamma``) and what was expected. Keys with a default
    may be left out. ``schedule_from_dict(s.to_dict()) == s`` for every schedule.
    """
    return _from_dict(d, _ROOT)
