"""A session's recent steps, for the status page: a bounded ring buffer.

One entry per step the session ran (applied or skipped) and per round of pushes that
failed: the step it was for, when it ended, each group's lr, the gradient norm, the
latency, the bytes of tensor data in and out, and for a round its contributors and
the workers of the previous round it went without. The last :data:`CAPACITY` are
kept in preallocated arrays (a structured row per entry and each group's lr: about 70
bytes an entry with one group, allocated at the first step), so a session's history
never grows past its size.

Who writes: :meth:`Session.record_step <adamserve.sessions.session.Session.record_step>`
(every step passes there, its lock held), the session's wake-up after a round ends (a
failed round), and the service once a request's latency and bytes are known
(:meth:`History.traffic`). Readers take a :meth:`History.snapshot` at any time: the
buffer has its own lock, never the session's, so a status page never waits for a step.

What is not here: the update norm (no kernel computes it, LAMB's aside, and it would
cost a pass over the parameters each step), and the lr scale an asynchronous session
applies to a stale push (the lr shown is the group's scheduled lr).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adamserve.engine import algorithms as alg
from adamserve.engine.optimizer import FlatOptimizer, StepReport

CAPACITY = 1024  # entries kept per session
MAX_GROUPS = 16  # groups whose lr an entry keeps (the first ones)
MAX_NAMES = 32  # missing workers named per entry (all are counted)
MAX_FUTURE = 10_000  # steps of a schedule's future one request may ask for
_SEARCH = 64  # newest entries :meth:`History.traffic` looks through for its step
_PENDING = 16  # steps whose traffic came before their entry (pushes into a round)


@dataclass(frozen=True)
class Entry:
    """One step (or failed round) as the history kept it."""

    step: int  # the step it was for; a skipped step or failed round: the one it would be
    time: float  # when it ended (seconds since the epoch)
    lr: tuple[float, ...]  # per group (the first MAX_GROUPS), as the step used it
    grad_norm: float | None  # the global gradient norm, where the step computed it
    skipped: bool = False  # non-finite gradients: nothing was applied
    nonfinite: int = 0  # tensors whose gradient held NaN or Inf
    failed: str = ""  # a round that failed: why (nothing was applied)
    latency: float | None = None  # seconds: the request's service time, or the round's
    bytes_in: int = 0  # tensor bytes the step's requests carried (gradients)
    bytes_out: int = 0  # tensor bytes its answers carried (parameters)
    contributors: int = 0  # pushes a round averaged (0: not a round)
    missing: tuple[str, ...] = ()  # workers of the previous round absent from this one
    missing_count: int = 0  # how many were absent (``missing`` names at most MAX_NAMES)


def step_of(report: StepReport) -> int:
    """The step a report is for: a skipped step did not move the count on."""
    return report.step + 1 if report.skipped else report.step


def lrs_at(opt: FlatOptimizer, step: int) -> tuple[float, ...]:
    """Each group's lr for step ``step`` (1 for the first update), as the engine
    computes it (the schedule sees ``step - 1``, torch's count before the update)."""
    out = []
    schedule = opt.schedule
    for g in opt.groups[:MAX_GROUPS]:
        base = alg.base_lr(opt.algorithm, g)  # optax's learning_rate too
        out.append(base if schedule is None else schedule.lr(max(step - 1, 0), base))
    return tuple(out)


def future_lr(opt: FlatOptimizer, steps: int) -> list[list[float]]:
    """Per group (the first MAX_GROUPS), the lr of each of the next ``steps`` steps."""
    schedule, start = opt.schedule, opt.step_count + 1
    groups = list(opt.groups)[:MAX_GROUPS]
    bases = [alg.base_lr(opt.algorithm, g) for g in groups]
    if schedule is None:
        return [[base] * steps for base in bases]
    return [[schedule.lr(start - 1 + k, base) for k in range(steps)] for base in bases]


# One row per entry; a step's whole row is written at once (a structured array: about
# 1 us, where a write per column costs several).
ROW = np.dtype([("step", np.int64), ("time", np.float64), ("grad_norm", np.float64),
                ("latency", np.float64), ("bytes_in", np.int64), ("bytes_out", np.int64),
                ("contributors", np.int32), ("missing_count", np.int32),
                ("nonfinite", np.int32), ("groups", np.int8), ("skipped", np.bool_)])


class History:
    """The ring buffer (see the module docstring). Entries are numbered from 0 in the
    order they were recorded; entry ``n`` lives in row ``n % capacity``."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected at least 1 entry, got {capacity}")
        self.capacity = capacity
        self.recorded = 0  # entries ever recorded (those before recorded - capacity are gone)
        self.failed_round = 0  # id of the latest failed round recorded (0: none)
        self._lock = threading.Lock()
        self._rows = np.zeros(0, ROW)  # allocated at the first entry
        self._lr = np.zeros((0, 0))  # row -> each group's lr (NaN past the row's groups)
        self._failed: dict[int, str] = {}  # entry number -> why (rare: a dict, not a column)
        self._missing: dict[int, tuple[str, ...]] = {}
        self._pending: dict[int, list[int]] = {}  # step -> [bytes in, bytes out]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows (the rare failed reasons and names not counted)."""
        return int(self._rows.nbytes) + int(self._lr.nbytes)

    def _allocate(self, groups: int) -> None:
        n = self.capacity
        if not len(self._rows):
            self._rows = np.zeros(n, ROW)
            self._lr = np.full((n, max(groups, 1)), np.nan)
        if groups > self._lr.shape[1]:  # groups were added: the lr columns grow
            lr = np.full((n, groups), np.nan)
            lr[:, :self._lr.shape[1]] = self._lr
            self._lr = lr

    def record(self, step: int, lr: tuple[float, ...], grad_norm: float | None, *,
               skipped: bool = False, nonfinite: int = 0, failed: str = "",
               latency: float | None = None, contributors: int = 0,
               missing: Sequence[str] = ()) -> None:
        """Keep one entry (the oldest goes once ``capacity`` are kept)."""
        lr = lr[:MAX_GROUPS]
        with self._lock:
            self._allocate(len(lr))
            n = self.recorded
            row = n % self.capacity
            if n >= self.capacity:
                self._failed.pop(n - self.capacity, None)
                self._missing.pop(n - self.capacity, None)
            bytes_in, bytes_out = self._pending.pop(step, (0, 0)) if self._pending else (0, 0)
            self._rows[row] = (step, time.time(), math.nan if grad_norm is None else grad_norm,
                               math.nan if latency is None else latency, bytes_in, bytes_out,
                               contributors, len(missing), nonfinite, len(lr), skipped)
            if len(lr) == self._lr.shape[1]:
                self._lr[row] = lr
            else:
                self._lr[row] = np.nan
                self._lr[row, :len(lr)] = lr
            if failed:
                self._failed[n] = failed
            if missing:
                self._missing[n] = tuple(missing[:MAX_NAMES])
            self.recorded = n + 1

    def record_step(self, report: StepReport, opt: FlatOptimizer, *,
                    latency: float | None = None, contributors: int = 0,
                    missing: Sequence[str] = ()) -> None:
        """Keep the step ``report`` describes (``opt``: its optimizer, after the step)."""
        step = step_of(report)
        norm = report.grad_norm
        self.record(step, lrs_at(opt, step),
                    norm if norm is not None and math.isfinite(norm) else None,
                    skipped=report.skipped, nonfinite=len(report.nonfinite), latency=latency,
                    contributors=contributors, missing=missing)

    def traffic(self, step: StepReport | int, bytes_in: int, bytes_out: int,
                latency: float | None = None) -> None:
        """Add a request's tensor bytes (and, for a step of its own, its service time)
        to the entry of ``step`` (a report: the step it is for). A push into a round
        that has not ended yet is added to the round's entry when it is recorded."""
        if isinstance(step, StepReport):
            step = step_of(step)
        with self._lock:
            rows = self._rows
            steps = rows["step"]
            oldest = max(self.recorded - min(_SEARCH, self.capacity), 0)
            for n in range(self.recorded - 1, oldest - 1, -1):
                row = n % self.capacity
                if steps[row] == step:  # (field views: a row's np.void is slower)
                    rows["bytes_in"][row] += bytes_in
                    rows["bytes_out"][row] += bytes_out
                    if latency is not None:
                        rows["latency"][row] = latency
                    return
            if len(self._pending) >= _PENDING:  # rounds that never ended
                del self._pending[min(self._pending)]
            pending = self._pending.setdefault(step, [0, 0])
            pending[0] += bytes_in
            pending[1] += bytes_out

    def snapshot(self, last: int | None = None) -> list[Entry]:
        """The entries kept, oldest first (``last``: only that many of the newest)."""
        with self._lock:
            kept = min(self.recorded, self.capacity)
            if last is not None:
                kept = min(kept, max(last, 0))
            first = self.recorded - kept
            if not kept:
                return []
            at = np.arange(first, self.recorded) % self.capacity
            rows = self._rows[at].tolist()  # tuples of Python numbers, in ROW's order
            lr = self._lr[at].tolist()
            failed = {n: w for n, w in self._failed.items() if n >= first}
            missing = {n: m for n, m in self._missing.items() if n >= first}
        out = []
        for i, (step, when, norm, latency, bytes_in, bytes_out, contributors, missing_count,
                nonfinite, groups, skipped) in enumerate(rows):
            n = first + i
            out.append(Entry(
                step=step, time=when, lr=tuple(lr[i][:groups]),
                grad_norm=None if math.isnan(norm) else norm, skipped=skipped,
                nonfinite=nonfinite, failed=failed.get(n, ""),
                latency=None if math.isnan(latency) else latency, bytes_in=bytes_in,
                bytes_out=bytes_out, contributors=contributors, missing=missing.get(n, ()),
                missing_count=missing_count))
        return out

    def last_time(self) -> float | None:
        """When the newest entry ended (None: none yet)."""
        with self._lock:
            if not self.recorded:
                return None
            return float(self._rows["time"][(self.recorded - 1) % self.capacity])
