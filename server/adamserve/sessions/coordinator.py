"""The rounds of a session's workers: one coordinator per session, one state machine per round.

A synchronous round (see :mod:`adamserve.sessions.rounds`) goes through explicit states::

    OPEN --close--> APPLIED | SKIPPED          one server: the mean is applied at once
    OPEN --close--> STAGED --commit--> APPLIED | SKIPPED      a shard (exchange)
                    STAGED --commit--> LAMB --commit--> APPLIED   a shard running LAMB
    OPEN | STAGED | LAMB --fail--> FAILED      straggler timeout, device error, import

APPLIED, SKIPPED (non-finite gradients: nothing changed) and FAILED are final: the round
is then no longer the session's current one, and :attr:`RoundCoordinator.last` keeps
its outcome for late pushes, pulls and repeated commits. Any other transition is a bug
and raises :class:`IllegalTransition`.

The coordinator owns the rounds' buffers (the float64 sum of the pushes and their mean
in the session's precision: :attr:`RoundCoordinator.buffer_bytes`, counted with the
session's state; their allocation is counted against the caps before it happens, by
the ``reserve`` a push hands :meth:`RoundCoordinator.arrive`), the current round, the
members of the last applied one and the admission of pushes (staleness, one push per
worker per step). A push's own gradient is added to the sum on arrival and not kept:
a waiting worker holds no buffer. Every method
runs with the session's lock held; an applied step is handed to the session
(:meth:`RoundHost.record_step`), which keeps the push log, the version and the
checkpoint trigger. ``docs/exchange.md`` walks through the two-phase exchange.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from adamserve import metrics
from adamserve.engine.backend import make_blocks
from adamserve.engine.optimizer import FlatOptimizer, LambStep, StepReport
from adamserve.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from adamserve.sessions import meta
from adamserve.sessions.pushlog import PushId, PushLog
from adamserve.sessions.rounds import Outcome, WorkersConfig

log = logging.getLogger("adamserve.rounds")

BoolArray = npt.NDArray[np.bool_]
F64 = npt.NDArray[np.float64]
# Counts bytes about to be allocated against the server's caps while its block runs
# (SessionStore.reserved for this session); refuses (ResourceExhausted) when they do not fit.
Reserve = Callable[[int], AbstractContextManager[object]]


def _unreserved(nbytes: int) -> AbstractContextManager[object]:
    return nullcontext()


class RoundState(enum.Enum):
    OPEN = "open"  # taking pushes
    STAGED = "staged"  # closed; its mean gradient waits for the commit (exchange)
    LAMB = "lamb"  # LAMB's first commit ran up to the trust ratio; waits for the second
    APPLIED = "applied"
    SKIPPED = "skipped"  # non-finite gradients: nothing was applied
    FAILED = "failed"  # nothing was applied; the workers push again


NEXT: Mapping[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset({RoundState.STAGED, RoundState.APPLIED, RoundState.SKIPPED,
                                RoundState.FAILED}),
    RoundState.STAGED: frozenset({RoundState.LAMB, RoundState.APPLIED, RoundState.SKIPPED,
                                  RoundState.FAILED}),
    RoundState.LAMB: frozenset({RoundState.APPLIED, RoundState.FAILED}),
    RoundState.APPLIED: frozenset(),
    RoundState.SKIPPED: frozenset(),
    RoundState.FAILED: frozenset(),
}
WAITING_FOR_COMMIT = frozenset({RoundState.STAGED, RoundState.LAMB})


class IllegalTransition(RuntimeError):
    """A round was moved along an edge its state machine does not have: a server bug."""


@dataclass(eq=False)
class Round:
    """One step's round. ``pushes`` maps each contributor to its push sequence (0 for
    a push without one); they go into the push log only once the step is applied, so
    a round lost to a failure or a restart leaves the workers free to push again."""

    step: int  # the step it is for: the session's step count + 1 when it opened
    id: int  # unique in the session: a commit names the round it is for
    active: BoolArray  # the tensors its pushes carry (the first push decides)
    pushes: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    state: RoundState = RoundState.OPEN
    grad_sumsq: F64 | None = None  # once STAGED: this shard's per-tensor sums of squares
    lamb: LambStep | None = None  # in LAMB: the step up to its trust ratio
    outcome: Outcome | None = None  # once STAGED or final
    # the answers it owes waiting workers, by datatype, and the parameters kept for them
    # when they changed before all were collected (see RoundCoordinator.keep_answers)
    owed: Counter[str] = field(default_factory=Counter)
    kept: dict[str, Any] = field(default_factory=dict)
    # a lazy algorithm's (SparseAdam's) rows per tensor: the union of what the pushes
    # sent row-sparse (None for a tensor: every row); None: every row of every tensor
    rows: list[npt.NDArray[np.int64] | None] | None = None

    def join_rows(self, rows: Sequence[npt.NDArray[np.int64] | None] | None) -> None:
        if self.rows is None:
            return  # dense so far: stays dense
        if rows is None:
            self.rows = None
            return
        self.rows = [None if a is None or b is None else np.union1d(a, b)
                     for a, b in zip(self.rows, rows, strict=True)]

    def collected(self, datatype: str) -> None:
        """A waiting worker has its answer (or gave up): once none is owed, the kept
        parameters go."""
        self.owed[datatype] -= 1
        if self.owed[datatype] <= 0:
            del self.owed[datatype]
        if not self.owed:
            self.kept.clear()

    def move(self, to: RoundState) -> None:
        if to not in NEXT[self.state]:
            raise IllegalTransition(f"round {self.id} (step {self.step}): {self.state.name} "
                                    f"-> {to.name} is not a transition of a round")
        self.state = to

    @property
    def arrived(self) -> int:
        return len(self.pushes)

    @property
    def staged(self) -> bool:
        """Closed and waiting for a commit (STAGED or LAMB)."""
        return self.state in WAITING_FOR_COMMIT

    def deadline(self, config: WorkersConfig) -> float | None:
        if config.straggler_timeout <= 0 or self.state is not RoundState.OPEN or not self.pushes:
            return None
        return self.started + config.straggler_timeout


class RoundHost(Protocol):
    """What a coordinator needs of its session (:class:`adamserve.sessions.session.Session`)."""

    id: str
    opt: FlatOptimizer
    pushes: PushLog
    deleted: bool

    @property
    def workers(self) -> WorkersConfig: ...

    def wake(self) -> None: ...

    def record_step(self, report: StepReport, pushes: Mapping[str, int]) -> None: ...


class RoundCoordinator:
    """The rounds of one session (see the module docstring); its lock held throughout."""

    def __init__(self, host: RoundHost) -> None:
        self._host = host
        self.current: Round | None = None  # OPEN, STAGED or LAMB
        self.ended: Round | None = None  # the latest round that ended
        self.last: Outcome | None = None  # how the latest round ended
        self.members: frozenset[str] = frozenset()  # the workers of the latest applied round
        # allocated (both) when the first round opens, kept for the next ones
        self._sum: Any = None  # the pushes' sum (float64)
        self._mean: Any = None  # a closed round's mean, in the session's precision
        self._anonymous = 0  # numbers the pushes that carry no worker id
        self._ids = secrets.randbits(40)  # round ids from before a restart are not reused

    # -- admission ------------------------------------------------------------

    def in_rounds(self) -> bool:
        """Whether pushes go through a round: several workers, or a shard's staged steps."""
        w = self._host.workers
        return w.mode == "sync" and (w.count > 1 or w.exchange or self.current is not None)

    def admit(self, push: PushId | None, base_step: int | None) -> int:
        """Refuse a push the session cannot take now; returns its staleness."""
        host = self._host
        w, now = host.workers, host.opt.step_count
        if push is not None and host.pushes.seen(push.worker, push.sequence):
            return 0  # applied before: acknowledged as a duplicate, whatever else holds
        if base_step is not None and base_step > now:
            raise FailedPrecondition(
                f"push computed from step {base_step}, but session {host.id!r} is at step "
                f"{now}: it has not reached that step (was it restored from an older "
                "checkpoint?); pull the parameters and compute the gradient again",
                reason="PUSH_AHEAD", metadata=meta(host.id, step=now, base_step=base_step))
        staleness = 0 if base_step is None else now - base_step
        if w.mode == "async":
            if w.max_staleness is not None and staleness > w.max_staleness:
                metrics.STALE_PUSHES.inc()
                raise FailedPrecondition(
                    f"push computed from step {base_step} is {staleness} steps stale (session "
                    f"{host.id!r} is at step {now}); the bound is {w.max_staleness}: pull "
                    "the parameters and compute the gradient again",
                    reason="STALE_PUSH", metadata=meta(host.id, step=now, base_step=base_step))
            return staleness
        if base_step is not None and staleness:
            metrics.STALE_PUSHES.inc()
            last = self.last
            missed = (" (that step was applied without it)" if last is not None
                      and last.step == base_step + 1 and last.error is None else "")
            raise FailedPrecondition(
                f"push for step {base_step + 1}{missed} of session {host.id!r} is too late: the "
                f"session is at step {now}{missed}; pull the parameters and compute the "
                f"gradient for step {now + 1}",
                reason="STALE_PUSH", metadata=meta(host.id, step=now, base_step=base_step))
        r = self.current
        if r is not None and push is not None and push.worker in r.pushes:
            if r.pushes[push.worker] != push.sequence:
                raise FailedPrecondition(
                    f"worker {push.worker!r} already pushed for step {r.step} (sequence "
                    f"{r.pushes[push.worker]}); one push per worker per step",
                    reason="DUPLICATE_WORKER_PUSH",
                    metadata=meta(host.id, step=r.step, worker=push.worker))
        elif r is not None and r.staged:
            raise FailedPrecondition(
                f"step {r.step} of session {host.id!r} is closed and waits for its commit; "
                "push for the next step after it is applied",
                reason="STEP_STAGED", metadata=meta(host.id, step=r.step))
        return staleness

    def lr_scale(self, staleness: int) -> float:
        """Asynchronous mode: lr * 1 / (1 + staleness), if the session asks for it."""
        scale = self._host.workers.scale_lr_by_staleness
        return 1.0 / (1 + staleness) if scale and staleness else 1.0

    # -- transitions ------------------------------------------------------------

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the rounds' buffers held now (the sum and the mean)."""
        return sum(int(b.nbytes) for b in (self._sum, self._mean) if b is not None)

    def round_bytes(self) -> int:
        """Bytes the rounds' buffers take once allocated: the float64 sum and the mean."""
        opt = self._host.opt
        return opt.layout.size * (8 + opt.dtype.itemsize)

    def arrive(self, grad: npt.NDArray[Any], active: BoolArray, push: PushId | None,
               answer: str | None = None, reserve: Reserve = _unreserved,
               rows: Sequence[npt.NDArray[np.int64] | None] | None = None) -> Round:
        """Add a decoded push (host memory) to the current round, opening one if there
        is none (once its gradient is in); the round closes when it is full.
        ``answer``: the datatype of the parameters the pusher waits for (None: none).
        ``reserve``: counts the rounds' buffers against the caps before they are
        allocated (the first round, or the first after the tensors changed); refused,
        nothing changes. ``rows``: a lazy algorithm's rows the push sent, per tensor
        (None: every row); the round steps the union of its pushes' rows."""
        host = self._host
        opt = host.opt
        r = self.current
        if r is not None and push is not None and push.worker in r.pushes:
            metrics.DUPLICATE_PUSHES.inc()
            if answer is not None:
                r.owed[answer] += 1
            return r  # the same push again: it waits on the round like the first
        if r is None and self._sum is None:
            self._allocate(reserve)
        src = opt.backend.to_device(grad)
        if r is None:
            self._sum[...] = src
            self._ids += 1
            r = self.current = Round(step=opt.step_count + 1, id=self._ids, active=active,
                                     rows=None if rows is None else list(rows))
        else:
            if not np.array_equal(active, r.active):
                raise InvalidArgument(self._mismatch(r, active))
            self._sum += src
            r.join_rows(rows)
        if push is not None:
            r.pushes[push.worker] = push.sequence
        else:
            self._anonymous += 1
            r.pushes[f"(anonymous {self._anonymous})"] = 0
        if answer is not None:
            r.owed[answer] += 1
        if r.arrived >= host.workers.count:
            self.close(r)
        return r

    def _allocate(self, reserve: Reserve) -> None:
        """The rounds' buffers, counted (``reserve``) before they are allocated; once
        allocated they count with the session's state (:attr:`buffer_bytes`)."""
        host = self._host
        opt = host.opt
        with reserve(self.round_bytes()):
            try:
                # float64: the sum of a round's pushes does not depend on the order
                # they arrived in (float32 additions would round differently)
                self._sum = opt.backend.zeros(opt.layout.size, np.dtype(np.float64))
                self._mean = opt.backend.zeros(opt.layout.size, opt.dtype)
            except MemoryError:
                self._sum = self._mean = None
                raise ResourceExhausted(
                    f"session {host.id!r}: no memory for the round's buffers "
                    f"({self.round_bytes()} bytes)",
                    reason="DEVICE_OUT_OF_MEMORY", metadata=meta(host.id)) from None

    def close(self, r: Round) -> None:
        """End OPEN round ``r`` with the mean of what arrived: apply it, or (exchange)
        stage it for the commit. If that raises (the device ran out of memory, say),
        the round fails: nothing applied, its workers push again."""
        host = self._host
        opt = host.opt
        missing = tuple(sorted(self.members - set(r.pushes)))
        report = None
        with self._or_fail(r):
            self._sum /= r.arrived
            self._mean[...] = self._sum  # the mean in the session's precision
            outcome = Outcome(r.step, r.id, contributors=r.arrived, missing=missing)
            if host.workers.exchange:
                blocks = make_blocks(opt.backend, opt.layout.offsets, r.active)
                r.grad_sumsq = opt.backend.segment_sumsq(self._mean, blocks, len(opt.layout))
                r.outcome = outcome
                r.move(RoundState.STAGED)
                host.wake()
            else:
                report = opt.step(None if r.active.all() else r.active, grad=self._mean,
                                  rows=r.rows)
                r.outcome = outcome
        if report is not None:
            self._finish(r, report)
        if r.arrived < host.workers.count:
            metrics.ROUNDS_SHORT.inc()

    def commit(self, r: Round, tensor_sumsq: F64, total_sumsq: float) -> None:
        """The first commit of STAGED round ``r``: its step with the whole model's sums of
        squares (APPLIED or SKIPPED); LAMB runs up to the trust ratio (LAMB)."""
        opt = self._host.opt
        if r.state is not RoundState.STAGED:
            raise IllegalTransition(f"round {r.id}: a first commit in state {r.state.name}")
        active = None if r.active.all() else r.active
        with self._or_fail(r):
            if opt.algorithm.value != "lamb":
                report = opt.step(active, tensor_sumsq, total_sumsq=total_sumsq, grad=self._mean,
                                  rows=r.rows)
            else:
                staged = opt.begin_lamb(active, tensor_sumsq, total_sumsq=total_sumsq,
                                        grad=self._mean)
                if not isinstance(staged, StepReport):
                    r.lamb = staged
                    r.move(RoundState.LAMB)
                    return
                report = staged  # skipped: non-finite gradients
        self._finish(r, report)

    def commit_lamb(self, r: Round, param_sumsq: F64, update_sumsq: F64) -> None:
        """LAMB's second commit of round ``r``: the trust ratios from whole-tensor norms."""
        if r.state is not RoundState.LAMB or r.lamb is None:
            raise IllegalTransition(f"round {r.id}: a second commit in state {r.state.name}")
        lamb = r.lamb
        with self._or_fail(r):
            report = lamb.finish(param_sumsq, update_sumsq)
        self._finish(r, report)

    def expire(self) -> bool:
        """End the OPEN round if its straggler timeout has passed: it fails, or (policy
        "apply") closes with what arrived. Returns whether it ended."""
        host, r = self._host, self.current
        if host.deleted or r is None:
            return False
        w = host.workers
        deadline = r.deadline(w)
        if deadline is None or time.monotonic() < deadline:
            return False
        if w.straggler_policy == "apply":
            log.warning("session %s: step %d applied with %d of %d workers after %.1f s",
                        host.id, r.step, r.arrived, w.count, w.straggler_timeout)
            self.close(r)
            return True
        missing = sorted(self.members - set(r.pushes))
        self.fail(r, (
            f"step {r.step} of session {host.id!r} failed: {r.arrived} of {w.count} workers "
            f"pushed within the straggler timeout of {w.straggler_timeout:g} s"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + "; nothing was applied: push the same gradients again"))
        return True

    def workers_changed(self) -> None:
        """After the number of workers changed: an OPEN round that is full now closes."""
        r = self.current
        if r is not None and r.state is RoundState.OPEN and r.arrived >= self._host.workers.count:
            self.close(r)

    def fail(self, r: Round, why: str) -> None:
        """End round ``r`` with nothing applied; its waiters get ``why``."""
        r.outcome = Outcome(r.step, r.id, contributors=r.arrived, error=why)
        r.move(RoundState.FAILED)
        metrics.ROUNDS_FAILED.inc()
        self._end(r)

    def fail_current(self, why: str) -> None:
        if self.current is not None:
            self.fail(self.current, why)

    def _finish(self, r: Round, report: StepReport) -> None:
        """Record round ``r``'s applied (or skipped) step and wake its waiters."""
        assert r.outcome is not None
        r.outcome.skipped = report.skipped
        r.outcome.grad_norm = report.grad_norm
        r.outcome.nonfinite = report.nonfinite
        r.lamb = None
        r.move(RoundState.SKIPPED if report.skipped else RoundState.APPLIED)
        self._host.record_step(report, r.pushes)
        self.members = frozenset(w for w, seq in r.pushes.items() if seq)
        self._end(r)

    def _end(self, r: Round) -> None:
        self.last = r.outcome
        self.current = None
        self.ended = r
        self._host.wake()

    def keep_answers(self, encode: Callable[[str], Any]) -> None:
        """The parameters are about to change outside a step (SetParameters): the
        answers the latest round still owes its waiting workers are encoded now, so a
        worker that collects late still gets the parameters of that round's step."""
        r = self.ended
        if r is None:
            return
        for datatype in r.owed:
            if datatype not in r.kept:
                r.kept[datatype] = encode(datatype)

    @contextmanager
    def _or_fail(self, r: Round) -> Iterator[None]:
        """Work on round ``r`` that, if it raises, fails the round."""
        try:
            yield
        except Exception as exc:
            host = self._host
            self.fail(r, f"step {r.step} of session {host.id!r} failed "
                      f"({type(exc).__name__}); nothing was applied: push again")
            if isinstance(exc, MemoryError):
                raise ResourceExhausted(
                    f"session {host.id!r}: the device ran out of memory applying step {r.step}",
                    reason="DEVICE_OUT_OF_MEMORY", metadata=meta(host.id, step=r.step)) from None
            raise

    # -- questions ----------------------------------------------------------------

    def deadline(self) -> float | None:
        """When the current round's straggler timeout passes (None: it has none)."""
        r = self.current
        return r.deadline(self._host.workers) if r is not None else None

    def for_commit(self, step: int, round_id: int) -> Round | Outcome:
        """The staged round a commit of ``step`` (``round_id``; 0: any) is for, or the
        outcome of that step if it was committed already."""
        r, last = self.current, self.last
        if r is not None and r.staged and r.step == step and round_id in (0, r.id):
            return r
        if last is not None and last.step == step and round_id in (0, last.round):
            return last
        host = self._host
        state = ("has no step waiting for a commit" if r is None or not r.staged
                 else f"waits for the commit of step {r.step} (round {r.id})")
        raise FailedPrecondition(
            f"commit of step {step}{f' (round {round_id})' if round_id else ''}: "
            f"session {host.id!r} is at step {host.opt.step_count} and {state}",
            reason="NO_STAGED_STEP", metadata=meta(host.id, step=host.opt.step_count))

    def failed(self, step: int) -> str:
        """Why the latest round for ``step`` applied nothing (failed, or skipped for
        non-finite gradients), unless a new round for it is open; else ""."""
        last, r = self.last, self.current
        if last is None or last.step != step or (r is not None and r.step == step):
            return ""
        if last.error is not None:
            return last.error
        if last.skipped:
            return (f"step {step} of session {self._host.id!r} was skipped: non-finite "
                    f"gradients{' in ' + ', '.join(last.nonfinite) if last.nonfinite else ''}"
                    "; nothing was applied: push again")
        return ""

    def refuse_if_staged(self, what: str) -> None:
        """Refuse a change of state while a step waits for its commit: the commit would
        apply coefficients and moments computed before it."""
        r = self.current
        if r is not None and r.staged:
            raise FailedPrecondition(
                f"cannot {what}: step {r.step} of session {self._host.id!r} is staged and "
                "waits for its commit", reason="STEP_STAGED",
                metadata=meta(self._host.id, step=r.step))

    def layout_changed(self) -> None:
        """The session's tensors changed (between rounds): the buffers have the old size."""
        self._sum = self._mean = None

    def _mismatch(self, r: Round, active: BoolArray) -> str:
        names = [t.name for t in self._host.opt.layout.tensors]
        mine = [n for n, a in zip(names, active, strict=True) if a]
        theirs = [n for n, a in zip(names, r.active, strict=True) if a]
        return (f"this push carries gradients for {len(mine)} tensors, the first push of step "
                f"{r.step} for {len(theirs)}: the pushes of one step carry the same tensors "
                f"(differing: {', '.join(sorted(set(mine) ^ set(theirs))[:8])})")
