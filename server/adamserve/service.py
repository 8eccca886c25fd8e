"""OptimizerService: the operations both transports expose, on domain types only.

Every request is checked against the session's layout before any state is
touched: gradients are decoded into the session's scratch gradient buffer (which
is not state), and only a complete, valid request reaches the kernel. Errors are
:mod:`adamserve.errors` exceptions whose messages name the tensor and what was
expected; each transport maps them to its status codes.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve import metrics
from adamserve.engine import schedules, statedict
from adamserve.engine.backend import make_blocks
from adamserve.engine.dtypes import WIRE_DTYPES, decode_into, encode
from adamserve.engine.optimizer import Layout, StepReport, TensorSpec
from adamserve.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from adamserve.sessions.checkpoints import CheckpointInfo, CheckpointStore
from adamserve.sessions.pushlog import PushLog
from adamserve.sessions.rounds import Outcome, Round, WorkersConfig
from adamserve.sessions.session import (
    Session,
    SessionConfig,
    check_tensors,
    slot_bytes,
)
from adamserve.sessions.store import SessionStore

log = logging.getLogger("adamserve.service")

# The longest one request waits for a step (a pull, or a step waiting for its round; the
# client asks again if it must): a server thread is not held forever by a client that
# waits for a step that never comes, or that went away.
MAX_WAIT = 600.0
# Requests waiting at once, over all sessions: each holds a transport thread (there are
# 1024); past this, waits are refused so that the pushes that end them still get one.
MAX_WAITERS = 768


@dataclass(frozen=True)
class TensorChunk:
    """Part (or all) of one named tensor, as raw little-endian bytes.

    ``offset`` is the index of the chunk's first element in the flattened tensor;
    the chunks of one tensor arrive in order.
    """

    name: str
    shape: tuple[int, ...]
    datatype: str
    data: bytes | memoryview
    offset: int = 0


@dataclass(frozen=True)
class SessionInfo:
    id: str
    algorithm: str
    dtype: str
    step: int
    tensors: tuple[TensorSpec, ...]
    groups: tuple[dict[str, Any], ...]
    lr: tuple[float, ...]  # the lr the next step will use, per group
    schedule: dict[str, Any] | None
    max_grad_norm: float | None
    clip_per_tensor: bool
    skip_nonfinite: bool
    state_bytes: int
    checkpointed_step: int
    backend: str
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass(frozen=True)
class StepResult:
    step: int
    skipped: bool
    grad_norm: float | None
    nonfinite: tuple[str, ...]
    params: list[TensorChunk] = field(default_factory=list)
    duplicate: bool = False  # this (worker, sequence) was applied before: acknowledged only
    staleness: int = 0  # steps between the push's base_step and the step it was applied to
    pending: bool = False  # in a round not applied yet (or staged for its commit)
    contributors: int = 0  # pushes averaged into a round's step (0: not a round)
    missing: tuple[str, ...] = ()  # workers of the previous round absent from this one
    # a staged step's sums of squares per tensor of the session, for the commit
    grad_sumsq: tuple[float, ...] = ()
    param_sumsq: tuple[float, ...] = ()  # LAMB, after the first commit
    update_sumsq: tuple[float, ...] = ()
    round: int = 0  # the round the push joined (sync), for its commit


@dataclass(frozen=True)
class PushId:
    """Who sent a push: a worker id and its sequence number (1, 2, ...), for exactly-once."""

    worker: str
    sequence: int

    def check(self) -> None:
        if not self.worker or len(self.worker) > 128:
            raise InvalidArgument(f"worker_id {self.worker!r}: expected 1-128 characters")
        if self.sequence < 1:
            raise InvalidArgument(f"sequence {self.sequence}: expected an integer >= 1")


def _info(s: Session) -> SessionInfo:
    opt = s.opt
    return SessionInfo(
        id=s.id,
        algorithm=s.config.algorithm,
        dtype=s.config.dtype,
        step=opt.step_count,
        tensors=opt.layout.tensors,
        groups=tuple(statedict.torch_group(h) for h in opt.groups),
        lr=tuple(opt.current_lr(g) for g in range(len(opt.groups))),
        schedule=opt.schedule.to_dict() if opt.schedule is not None else None,
        max_grad_norm=opt.clip.max_norm,
        clip_per_tensor=opt.clip.per_tensor,
        skip_nonfinite=opt.skip_nonfinite,
        state_bytes=s.state_bytes,
        checkpointed_step=s.checkpointed_step,
        backend=opt.backend.name,
        workers=s.config.workers,
        labels=dict(s.config.labels),
    )


def _not_staged(session: Session, what: str) -> None:
    """Refuse a change of state while a shard's step waits for its commit: the commit
    would apply coefficients and moments computed before it."""
    r = session.round
    if r is not None and r.staged:
        raise FailedPrecondition(f"cannot {what}: step {r.step} of session {session.id!r} "
                                 "is staged and waits for its commit")


def _round_failed(session: Session, step: int) -> str:
    """Why the latest round for ``step`` applied nothing (failed, or skipped for
    non-finite gradients), unless a new round for it is open; else ""."""
    last, r = session.last, session.round
    if last is None or last.step != step or (r is not None and r.step == step):
        return ""
    if last.error is not None:
        return last.error
    if last.skipped:
        return (f"step {step} of session {session.id!r} was skipped: non-finite gradients"
                f"{' in ' + ', '.join(last.nonfinite) if last.nonfinite else ''}; nothing was "
                "applied: push again")
    return ""


def _sums(what: str, values: Sequence[float], n: int,
          finite: bool = False) -> npt.NDArray[np.float64]:
    """A commit's per-tensor sums of squares: ``n`` numbers >= 0. NaN and Inf (a
    non-finite gradient somewhere) are kept unless ``finite``: LAMB's norms come from a
    step that passed the non-finite check."""
    out = np.asarray(values, dtype=np.float64)
    if out.shape != (n,):
        raise InvalidArgument(f"{what}: expected {n} numbers, one per tensor of the session, "
                              f"got {len(values)}")
    if (out < 0).any():
        raise InvalidArgument(f"{what}: sums of squares cannot be negative")
    if finite and not np.isfinite(out).all():
        raise InvalidArgument(f"{what}: expected finite sums of squares")
    return out


def _check_datatype(datatype: str | None, what: str) -> None:
    if datatype is not None and datatype not in WIRE_DTYPES:
        raise InvalidArgument(f"{what} {datatype!r}: expected one of {', '.join(WIRE_DTYPES)}")


class _Assembler:
    """Decodes chunks of named tensors into a flat host buffer, checking each one."""

    def __init__(self, layout: Layout, out: npt.NDArray[Any],
                 scope: str = "in this session") -> None:
        self.layout = layout
        self.scope = scope
        self.out = out
        self.received = np.zeros(len(self.layout), dtype=np.int64)
        self.seen = np.zeros(len(self.layout), dtype=bool)  # a chunk came (maybe empty)
        self.sumsq = np.zeros(len(self.layout), dtype=np.float64)
        self.bytes = 0

    def add(self, chunk: TensorChunk) -> tuple[int, int, int]:
        """Check and decode one chunk; returns (tensor index, first, last+1 flat element)."""
        try:
            i = self.layout.index(chunk.name)
        except KeyError:
            names = [t.name for t in self.layout.tensors]
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise InvalidArgument(
                f"tensor {chunk.name!r} is not {self.scope}; expected one of {shown}"
            ) from None
        t = self.layout.tensors[i]
        if chunk.datatype not in WIRE_DTYPES:
            raise InvalidArgument(
                f"tensor {chunk.name!r}: unknown datatype {chunk.datatype!r}; expected one of "
                f"{', '.join(WIRE_DTYPES)}")
        if tuple(chunk.shape) != t.shape:
            raise InvalidArgument(
                f"tensor {chunk.name!r}: expected shape {list(t.shape)}, got {list(chunk.shape)}")
        itemsize = WIRE_DTYPES[chunk.datatype].itemsize
        nbytes = len(chunk.data)
        if nbytes % itemsize:
            raise InvalidArgument(
                f"tensor {chunk.name!r}: {nbytes} bytes is not a whole number of "
                f"{chunk.datatype} elements ({itemsize} bytes each)")
        count = nbytes // itemsize
        done = int(self.received[i])
        if chunk.offset != done:
            raise InvalidArgument(
                f"tensor {chunk.name!r}: chunk starts at element {chunk.offset}, expected "
                f"{done} (chunks of a tensor arrive in order, each exactly once)")
        if done + count > t.numel:
            raise InvalidArgument(
                f"tensor {chunk.name!r}: {done + count} elements sent, expected {t.numel} "
                f"(shape {list(t.shape)})")
        lo = int(self.layout.offsets[i]) + done
        self.sumsq[i] += decode_into(self.out[lo:lo + count], chunk.data, chunk.datatype)
        self.received[i] = done + count
        self.seen[i] = True
        self.bytes += nbytes
        return i, lo, lo + count

    def finish(self, require_all: bool) -> npt.NDArray[np.bool_]:
        """Which tensors were sent; each must be complete (and all of them if required)."""
        numel = np.diff(self.layout.offsets)
        sent = self.received > 0
        if not self.seen.any():
            raise InvalidArgument("the request carries no gradient tensors")
        incomplete = sent & (self.received != numel)
        missing = ~sent & (numel > 0) if require_all else np.zeros_like(sent)
        for i in np.flatnonzero(incomplete):
            t = self.layout.tensors[int(i)]
            raise InvalidArgument(
                f"tensor {t.name!r}: received {int(self.received[i])} of {t.numel} elements")
        if missing.any():
            names = [self.layout.tensors[int(i)].name for i in np.flatnonzero(missing)]
            raise InvalidArgument(f"missing tensors: {', '.join(names[:8])}"
                                  + (", ..." if len(names) > 8 else ""))
        return np.asarray(sent | (numel == 0), dtype=np.bool_)


class OptimizerService:
    def __init__(self, store: SessionStore, *, checkpoint_every_steps: int = 0,
                 checkpoint_every_seconds: float = 0.0) -> None:
        self.store = store
        self.checkpoints: CheckpointStore | None = store.checkpoints
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self.ready = False
        self._waiting = 0  # requests in _wait now
        self._waiting_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> list[str]:
        restored = self.store.restore_all()
        self._gauge()
        self.ready = True
        return restored

    def _gauge(self) -> None:
        metrics.SESSIONS.set(len(self.store.all()))
        metrics.STATE_BYTES.set(self.store.total_bytes())

    # -- sessions ------------------------------------------------------------

    def create(self, session_id: str, config: SessionConfig,
               initial: Iterable[TensorChunk] = ()) -> SessionInfo:
        """Create a session; tensors without initial values start at zero."""
        session = self.store.create(session_id, config)  # returned locked
        try:
            host = np.zeros(session.opt.layout.size, dtype=session.opt.dtype)
            asm = _Assembler(session.opt.layout, host)
            for chunk in initial:
                asm.add(chunk)
            if asm.bytes:
                asm.finish(require_all=False)
            session.opt.param[...] = session.opt.backend.to_device(host)
            session.version = 1  # never checkpointed yet
        except BaseException:
            session.deleted = True
            self.store.remove(session)
            raise
        finally:
            session.lock.release()
        self._gauge()
        log.info("created session %s: %s, %d tensors, %d elements", session_id,
                 config.algorithm, len(config.tensors), session.opt.layout.size)
        return _info(session)

    def describe(self, session_id: str) -> SessionInfo:
        return _info(self.store.get(session_id))

    def list(self) -> builtins.list[SessionInfo]:
        return [_info(s) for s in self.store.all()]

    def delete(self, session_id: str) -> None:
        with self._locked(session_id) as session:
            session.deleted = True
            session.changed.notify_all()
            self.store.remove(session)
            if self.checkpoints is not None:
                self.checkpoints.delete(session_id)
        self._gauge()

    @contextmanager
    def _locked(self, session_id: str) -> Iterator[Session]:
        """The session with its lock held; NotFound if it was deleted while we waited."""
        session = self.store.get(session_id)
        with session.lock:
            if session.deleted:
                raise NotFound(f"session {session_id!r} does not exist")
            yield session

    # -- steps ---------------------------------------------------------------

    def step(self, session_id: str, grads: Iterable[TensorChunk], *,
             return_datatype: str | None = "FP32", require_all: bool = False,
             push_id: PushId | None = None, base_step: int | None = None,
             wait: float | None = None) -> StepResult:
        """Apply one update from ``grads``; tensors not sent are left as they are.

        ``return_datatype`` None returns no parameters (a push). ``push_id``: a push
        this session applied before is acknowledged (``duplicate``) and not applied
        again, so a client may retry a step whose answer it lost. ``base_step``: the
        step whose parameters the gradient was computed from (staleness checks).

        With several workers (synchronous mode) the push joins the open round: a
        push returns at once (``pending``), a step waits for the round and returns
        its outcome and the parameters of that step (``wait``: for at most that many
        seconds, and never more than ``MAX_WAIT``). A shard of an exchange session
        waits for the round to close and returns its sums of squares (``pending``);
        :meth:`commit` applies it.
        """
        _check_datatype(return_datatype, "return datatype")
        if push_id is not None:
            push_id.check()
        if base_step is not None and base_step < 0:
            raise InvalidArgument(f"base_step {base_step}: expected an integer >= 0")
        t0 = time.perf_counter()
        session = self.store.get(session_id)
        with self._locked(session_id) as current:  # refuse before reading the body
            if current is not session:
                raise NotFound(f"session {session_id!r} was replaced during the request")
            if session.round is not None:  # a round past its straggler timeout ends now,
                self._expire(session, session.round)  # not with this push in it
            self._admit(session, push_id, base_step)
            multi = self._in_rounds(session)
        # One worker: its request is decoded into the session's gradient buffer, one at a
        # time (intake). Rounds: each push into a buffer of its own, so a worker whose
        # upload stalls holds up no other worker (nor the straggler timeout).
        waiting: Round | None = None
        opt = session.opt
        with contextlib.nullcontext() if multi else session.intake:
            own = multi or opt.backend.name != "cpu"
            host = np.empty(opt.layout.size, opt.dtype) if own else opt.grad
            asm = _Assembler(opt.layout, host)
            for chunk in grads:
                asm.add(chunk)
            active = asm.finish(require_all)
            with self._locked(session_id) as current:
                if current is not session:
                    raise NotFound(f"session {session_id!r} was replaced during the request")
                if asm.layout is not opt.layout:  # add_tensors ran while this push arrived
                    raise FailedPrecondition(
                        f"the tensors of session {session_id!r} changed while this push "
                        "arrived: push again")
                duplicate = self._seen(session, push_id, base_step)
                staleness = self._admit(session, push_id, base_step)
                if duplicate:
                    report = StepReport(opt.step_count, False, None)
                elif self._in_rounds(session):
                    waiting = self._arrive(session, host, active, push_id)
                else:
                    report = self._apply(session, host, active, asm.sumsq,
                                         self._lr_scale(session, staleness), intake=not multi)
                    if push_id is not None and not report.skipped:
                        session.pushes.record(push_id.worker, push_id.sequence)
                    if not report.skipped:
                        self._auto_checkpoint(session, report)
                if waiting is None:
                    params = (self._encode(session, None, return_datatype) if return_datatype
                              else [])
        if waiting is not None:
            return self._round_result(session, waiting, return_datatype, wait)
        self._count(report.skipped, t0)
        return StepResult(report.step, report.skipped, report.grad_norm, report.nonfinite, params,
                          duplicate, staleness=staleness, contributors=0 if duplicate else 1)

    @staticmethod
    def _count(skipped: bool, t0: float | None) -> None:
        metrics.STEPS.inc()
        if t0 is not None:  # a round's step has no one request to time
            metrics.STEP_SECONDS.observe(time.perf_counter() - t0)
        if skipped:
            metrics.SKIPPED_STEPS.inc()

    @staticmethod
    def _seen(session: Session, push_id: PushId | None, base_step: int | None = None) -> bool:
        """Whether this push was applied before (raises if the log cannot take it).

        A push numbered by the step it is for (sequence = base_step + 1, as the client
        numbers the pushes of a named worker, so that a restarted worker goes on where
        the session is) may jump ahead of the worker's last one by the steps others made.
        """
        if push_id is None:
            return False
        if session.pushes.seen(push_id.worker, push_id.sequence):
            metrics.DUPLICATE_PUSHES.inc()
            return True
        if base_step is not None and push_id.sequence == base_step + 1:
            return False
        try:
            session.pushes.check(push_id.worker, push_id.sequence)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return False

    @staticmethod
    def _in_rounds(session: Session) -> bool:
        """Whether pushes go through a round: several workers, or a shard's staged steps."""
        w = session.config.workers
        return w.mode == "sync" and (w.count > 1 or w.exchange or session.round is not None)

    @staticmethod
    def _lr_scale(session: Session, staleness: int) -> float:
        w = session.config.workers
        return 1.0 / (1 + staleness) if w.scale_lr_by_staleness and staleness else 1.0

    def _admit(self, session: Session, push_id: PushId | None, base_step: int | None) -> int:
        """Refuse a push the session cannot take now (lock held); returns its staleness."""
        w = session.config.workers
        now = session.opt.step_count
        if push_id is not None and session.pushes.seen(push_id.worker, push_id.sequence):
            return 0  # applied before: acknowledged as a duplicate, whatever else holds
        if base_step is not None and base_step > now:
            raise FailedPrecondition(
                f"push computed from step {base_step}, but session {session.id!r} is at step "
                f"{now}: it has not reached that step (was it restored from an older "
                "checkpoint?); pull the parameters and compute the gradient again")
        staleness = 0 if base_step is None else now - base_step
        if w.mode == "async":
            if w.max_staleness is not None and staleness > w.max_staleness:
                metrics.STALE_PUSHES.inc()
                raise FailedPrecondition(
                    f"push computed from step {base_step} is {staleness} steps stale (session "
                    f"{session.id!r} is at step {now}); the bound is {w.max_staleness}: pull "
                    "the parameters and compute the gradient again")
            return staleness
        if base_step is not None and staleness:
            metrics.STALE_PUSHES.inc()
            last = session.last
            missed = (" (that step was applied without it)" if last is not None
                      and last.step == base_step + 1 and last.error is None else "")
            raise FailedPrecondition(
                f"push for step {base_step + 1}{missed} of session {session.id!r} is too late: the "
                f"session is at step {now}{missed}; pull the parameters and compute the "
                f"gradient for step {now + 1}")
        r = session.round
        if r is not None and push_id is not None and push_id.worker in r.pushes:
            if r.pushes[push_id.worker] != push_id.sequence:
                raise FailedPrecondition(
                    f"worker {push_id.worker!r} already pushed for step {r.step} (sequence "
                    f"{r.pushes[push_id.worker]}); one push per worker per step")
        elif r is not None and r.staged:
            raise FailedPrecondition(
                f"step {r.step} of session {session.id!r} is closed and waits for its commit; "
                "push for the next step after it is applied")
        return staleness

    def _apply(self, session: Session, host: npt.NDArray[Any], active: npt.NDArray[np.bool_],
               sumsq: npt.NDArray[np.float64] | None, lr_scale: float = 1.0, *,
               intake: bool = True) -> StepReport:
        """Step ``session`` (its lock held) from the decoded gradients in ``host``;
        without ``intake`` held the session's gradient buffer is not ours to write."""
        opt = session.opt
        grad = None
        if host is not opt.grad:
            if intake:
                opt.grad[...] = opt.backend.to_device(host)
            else:
                grad = opt.backend.to_device(host)
        report = opt.step(None if active.all() else active, grad_sumsq=sumsq, lr_scale=lr_scale,
                          grad=grad)
        if not report.skipped:
            session.version += 1
            session.changed.notify_all()  # pulls waiting for this step
        return report

    # -- rounds (several workers, or a shard's two-phase step) ---------------------------

    def _arrive(self, session: Session, host: npt.NDArray[Any], active: npt.NDArray[np.bool_],
                push_id: PushId | None) -> Round:
        """Add a decoded push to the open round (intake and lock held); close it if full."""
        opt = session.opt
        r = session.round
        if r is not None and push_id is not None and push_id.worker in r.pushes:
            metrics.DUPLICATE_PUSHES.inc()
            return r  # the same push again: it waits on the round like the first
        src = host if host is opt.grad else opt.backend.to_device(host)
        if r is None:  # the first push opens the round, once its gradient is in
            if session.acc is None:
                try:
                    # float64: the sum of a round's pushes does not depend on the order
                    # they arrived in (float32 additions would round differently)
                    session.acc = opt.backend.zeros(opt.layout.size, np.dtype(np.float64))
                except MemoryError:
                    raise ResourceExhausted(
                        f"session {session.id!r}: no memory for the round accumulator") from None
            session.acc[...] = src
            session.rounds += 1
            r = session.round = Round(step=opt.step_count + 1, id=session.rounds,
                                      acc=session.acc, active=active)
        else:
            if r.active is None or not np.array_equal(active, r.active):
                raise InvalidArgument(self._active_mismatch(session, r, active))
            r.acc += src
        if push_id is not None:
            r.pushes[push_id.worker] = push_id.sequence
        else:
            session.anonymous += 1
            r.pushes[f"(anonymous {session.anonymous})"] = 0
        if r.arrived >= session.config.workers.count:
            self._close(session, r)
        return r

    @staticmethod
    def _active_mismatch(session: Session, r: Round, active: npt.NDArray[np.bool_]) -> str:
        names = [t.name for t in session.opt.layout.tensors]
        mine = [n for n, a in zip(names, active, strict=True) if a]
        theirs = [n for n, a in zip(names, r.active if r.active is not None else active,
                                    strict=True) if a]
        return (f"this push carries gradients for {len(mine)} tensors, the first push of step "
                f"{r.step} for {len(theirs)}: the pushes of one step carry the same tensors "
                f"(differing: {', '.join(sorted(set(mine) ^ set(theirs))[:8])})")

    def _close(self, session: Session, r: Round) -> None:
        """End round ``r`` with the mean of what arrived (intake and lock held): apply it,
        or stage it for the commit of an exchange session. If that fails (the device ran
        out of memory, say), the round fails: nothing applied, its workers push again."""
        opt = session.opt
        missing = tuple(sorted(session.members - set(r.pushes)))
        with self._round_or_fail(session, r):
            r.acc /= r.arrived
            if session.round_grad is None:
                session.round_grad = opt.backend.zeros(opt.layout.size, opt.dtype)
            session.round_grad[...] = r.acc  # the mean in the session's precision
            if session.config.workers.exchange:
                blocks = make_blocks(opt.backend, opt.layout.offsets, r.active)
                r.grad_sumsq = opt.backend.segment_sumsq(session.round_grad, blocks,
                                                         len(opt.layout))
                r.outcome = Outcome(r.step, r.id, contributors=r.arrived, missing=missing)
                r.staged = True
                session.changed.notify_all()
            else:
                active = None if r.active is None or r.active.all() else r.active
                report = opt.step(active, grad=session.round_grad)
                r.outcome = Outcome(r.step, r.id, contributors=r.arrived, missing=missing)
                self._finish_round(session, r, report)
        if r.arrived < session.config.workers.count:
            metrics.ROUNDS_SHORT.inc()

    def _finish_round(self, session: Session, r: Round, report: StepReport) -> None:
        """Record a round's applied (or skipped) step and wake its waiters (lock held)."""
        assert r.outcome is not None
        r.outcome.skipped = report.skipped
        r.outcome.grad_norm = report.grad_norm
        r.outcome.nonfinite = report.nonfinite
        r.lamb = None
        self._count(report.skipped, None)  # once per step, not per worker
        if not report.skipped:
            session.version += 1
            for worker, sequence in r.pushes.items():
                if sequence:
                    session.pushes.record(worker, sequence)
            self._auto_checkpoint(session, report)
        session.members = frozenset(w for w, seq in r.pushes.items() if seq)
        session.last = r.outcome
        session.round = None
        session.changed.notify_all()

    def _fail_round(self, session: Session, r: Round, why: str) -> None:
        r.outcome = Outcome(r.step, r.id, contributors=r.arrived, error=why)
        session.last = r.outcome
        session.round = None
        metrics.ROUNDS_FAILED.inc()
        session.changed.notify_all()

    def _expire(self, session: Session, r: Round) -> None:
        """The straggler timeout of round ``r`` passed (intake and lock held)."""
        if session.deleted or session.round is not r or r.staged or r.outcome is not None:
            return
        w = session.config.workers
        deadline = r.deadline(w)
        if deadline is None or time.monotonic() < deadline:
            return
        if w.straggler_policy == "apply":
            log.warning("session %s: step %d applied with %d of %d workers after %.1f s",
                        session.id, r.step, r.arrived, w.count, w.straggler_timeout)
            self._close(session, r)
            return
        missing = sorted(session.members - set(r.pushes))
        self._fail_round(session, r, (
            f"step {r.step} of session {session.id!r} failed: {r.arrived} of {w.count} workers "
            f"pushed within the straggler timeout of {w.straggler_timeout:g} s"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + "; nothing was applied: push the same gradients again"))

    def expire_rounds(self) -> int:
        """End the rounds past their straggler timeout now, also those nobody waits on
        (workers that push and pull later); returns how many. Run every fraction of a
        second by the server."""
        n = 0
        now = time.monotonic()
        for session in self.store.all():
            r = session.round
            deadline = r.deadline(session.config.workers) if r is not None else None
            if deadline is None or now < deadline:
                continue
            with session.lock:
                if session.round is r and r is not None:
                    self._expire(session, r)
                    n += session.round is not r
        return n

    def _wait(self, session: Session, done: Callable[[], bool], timeout: float | None,
              what: str) -> None:
        """Block until ``done()`` (checked under the lock), enforcing straggler timeouts;
        DeadlineExceeded after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        with session.changed:
            if done():  # no need to wait: counts against no cap
                return
        with self._waiting_lock:
            if self._waiting >= MAX_WAITERS:
                raise ResourceExhausted(
                    f"{self._waiting} requests are waiting for steps already; try again when "
                    "some have ended")
            self._waiting += 1
        try:
            self._wait_until(session, done, end, timeout, what)
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    def _wait_until(self, session: Session, done: Callable[[], bool], end: float | None,
                    timeout: float | None, what: str) -> None:
        while True:
            with session.changed:
                while not done():
                    if session.deleted:
                        if session.restored_to is not None:
                            raise Aborted(f"session {session.id!r} was restored to its "
                                          f"checkpoint of step {session.restored_to}: pull the "
                                          "parameters and push again")
                        raise NotFound(f"session {session.id!r} was deleted")
                    r = session.round
                    dl = r.deadline(session.config.workers) if r is not None else None
                    now = time.monotonic()
                    if dl is not None and now >= dl:
                        break
                    if end is not None and now >= end:
                        raise DeadlineExceeded(f"timed out after {timeout:g} s waiting for {what}")
                    limit = min(x for x in (dl, end, now + 60.0) if x is not None)
                    session.changed.wait(limit - now)
                else:
                    return
            with session.lock:  # the round has run out of time
                if session.round is not None:
                    self._expire(session, session.round)

    def _round_result(self, session: Session, r: Round, return_datatype: str | None,
                      wait: float | None = None) -> StepResult:
        """What a push into round ``r`` answers: at once for a plain push; otherwise once
        the round is applied (or staged, for an exchange session)."""
        exchange = session.config.workers.exchange
        if return_datatype is None and not exchange:
            with session.lock:
                if r.outcome is None:
                    return StepResult(session.opt.step_count, False, None, (), pending=True)
        self._wait(session, lambda: r.outcome is not None and (
            r.staged or r.outcome.error is not None or session.round is not r),
            MAX_WAIT if wait is None else min(wait, MAX_WAIT),
            f"step {r.step} (its round has {r.arrived} of {session.config.workers.count} "
            "pushes; this one stays in it: send it again to wait again)")
        with self._locked(session.id) as current:
            if current is not session:
                raise NotFound(f"session {session.id!r} was replaced during the request")
            o = r.outcome
            if exchange and o is not None and o.error is None and r.grad_sumsq is not None:
                # the push's answer is its round's sums, even when another worker's
                # commit has applied the step since: this worker's commit then gets
                # the outcome, as every later commit does
                return StepResult(r.step - 1, False, None, (), pending=True,
                                  contributors=o.contributors, missing=o.missing,
                                  grad_sumsq=tuple(float(x) for x in r.grad_sumsq),
                                  round=r.id)
            return self._outcome(session, r, return_datatype)

    def _outcome(self, session: Session, r: Round,
                 return_datatype: str | None) -> StepResult:
        o = r.outcome
        assert o is not None
        if o.error is not None:
            raise Aborted(o.error)
        if session.round is r and r.staged:  # waiting for its commit
            lamb = r.lamb
            return StepResult(
                session.opt.step_count, False, None, (), pending=True,
                contributors=o.contributors, missing=o.missing, round=r.id,
                grad_sumsq=tuple(float(x) for x in r.grad_sumsq) if lamb is None and
                r.grad_sumsq is not None else (),
                param_sumsq=tuple(float(x) for x in lamb.param_sumsq) if lamb else (),
                update_sumsq=tuple(float(x) for x in lamb.update_sumsq) if lamb else ())
        params = self._encode(session, None, return_datatype) if return_datatype else []
        return StepResult(o.step if not o.skipped else o.step - 1, o.skipped, o.grad_norm,
                          o.nonfinite, params, contributors=o.contributors, missing=o.missing,
                          round=o.round)

    def commit(self, session_id: str, step: int, tensor_sumsq: Sequence[float],
               total_sumsq: float, *, param_sumsq: Sequence[float] = (),
               update_sumsq: Sequence[float] = (), round_id: int = 0,
               return_datatype: str | None = "FP32") -> StepResult:
        """Apply the staged step ``step`` of an exchange session (one shard of a model)
        with sums of squares over the whole model.

        ``tensor_sumsq``: per tensor of this session, the gradient's sum of squares over
        the whole tensor it is part of; ``total_sumsq``: over the whole gradient. For
        LAMB, this first commit returns the parameter and update sums of squares of
        this shard (``pending``); a second commit brings their whole-tensor totals in
        ``param_sumsq`` and ``update_sumsq``. ``round_id``: the round the push's answer
        named (0: whichever is staged for ``step``). A commit repeated (by another
        worker, or a retry) after the step was applied returns its outcome again.
        """
        _check_datatype(return_datatype, "return datatype")
        if not (total_sumsq >= 0 or math.isnan(total_sumsq)):
            raise InvalidArgument(f"total_sumsq {total_sumsq}: a sum of squares is >= 0")
        session = self.store.get(session_id)
        with self._locked(session_id) as current:
            if current is not session:
                raise NotFound(f"session {session_id!r} was replaced during the request")
            opt = session.opt
            r = session.round
            if (r is None or not r.staged or r.step != step
                    or (round_id and round_id != r.id)):
                last = session.last
                if last is not None and last.step == step and round_id in (0, last.round):
                    return self._outcome(session, Round(step, last.round, outcome=last),
                                         return_datatype)
                state = ("has no step waiting for a commit" if r is None or not r.staged
                         else f"waits for the commit of step {r.step} (round {r.id})")
                raise FailedPrecondition(
                    f"commit of step {step}{f' (round {round_id})' if round_id else ''}: "
                    f"session {session_id!r} is at step {opt.step_count} and {state}")
            nseg = len(opt.layout)
            sums = _sums("tensor_sumsq", tensor_sumsq, nseg)
            lamb = opt.algorithm.value == "lamb"
            if bool(param_sumsq) != bool(update_sumsq):
                raise InvalidArgument("param_sumsq and update_sumsq come together (LAMB's "
                                      "second commit)")
            if param_sumsq and not lamb:
                raise InvalidArgument(f"param_sumsq: session {session_id!r} runs "
                                      f"{opt.algorithm.value}; only LAMB takes a second commit")
            if param_sumsq:
                if r.lamb is None:
                    raise FailedPrecondition(
                        f"commit of step {step}: LAMB's second commit (param_sumsq) came "
                        "before the first (tensor_sumsq only)")
                psq = _sums("param_sumsq", param_sumsq, nseg, finite=True)
                usq = _sums("update_sumsq", update_sumsq, nseg, finite=True)
                self._apply_staged(session, r, lambda: r.lamb.finish(psq, usq))
                return self._outcome(session, r, return_datatype)
            if r.lamb is not None:  # the first commit again
                return self._outcome(session, r, return_datatype)
            active = None if r.active is None or r.active.all() else r.active

            def first() -> StepReport | None:
                grad = session.round_grad
                if not lamb:
                    return opt.step(active, sums, total_sumsq=float(total_sumsq), grad=grad)
                staged = opt.begin_lamb(active, sums, total_sumsq=float(total_sumsq), grad=grad)
                if isinstance(staged, StepReport):
                    return staged
                r.lamb = staged
                return None

            self._apply_staged(session, r, first)
            return self._outcome(session, r, return_datatype)

    def _apply_staged(self, session: Session, r: Round,
                      run: Callable[[], StepReport | None]) -> None:
        """Run a commit's work on staged round ``r``; a StepReport ends the round."""
        with self._round_or_fail(session, r):
            report = run()
        if report is not None:
            self._finish_round(session, r, report)

    @contextmanager
    def _round_or_fail(self, session: Session, r: Round) -> Iterator[None]:
        """Work on round ``r`` (lock held) that, if it raises (the device ran out of
        memory, say), fails the round: nothing applied, its workers push again."""
        try:
            yield
        except Exception as exc:
            self._fail_round(session, r, f"step {r.step} of session {session.id!r} failed "
                             f"({type(exc).__name__}); nothing was applied: push again")
            if isinstance(exc, MemoryError):
                raise ResourceExhausted(f"session {session.id!r}: the device ran out of "
                                        f"memory applying step {r.step}") from None
            raise

    def set_workers(self, session_id: str, count: int) -> SessionInfo:
        """Change the number of workers of a live session (workers joined or left).

        A round that already has ``count`` pushes closes at once."""
        session = self.store.get(session_id)
        with self._locked(session_id) as current:
            if current is not session:
                raise NotFound(f"session {session_id!r} was replaced during the request")
            r = session.round
            if session.config.workers.exchange and r is not None and r.pushes:
                # each shard would close its round with whichever pushes it holds
                raise FailedPrecondition(
                    f"session {session_id!r} is a shard with a round of {r.arrived} pushes "
                    f"open for step {r.step}: change the number of workers between steps")
            workers = replace(session.config.workers, count=count)
            try:
                workers.check()
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            session.config = replace(session.config, workers=workers)
            session.version += 1
            r = session.round
            if r is not None and not r.staged and r.arrived >= count:
                self._close(session, r)
            session.changed.notify_all()
            return _info(session)

    def step_stream(self, session_id: str, grads: Iterable[TensorChunk], *,
                    return_datatype: str | None = "FP32", push_id: PushId | None = None
                    ) -> Iterator[TensorChunk | StepResult]:
        """Full duplex: apply each gradient chunk as it arrives and yield its updated
        parameters at once; the :class:`StepResult` comes last.

        Only for sessions whose step needs nothing computed over a whole tensor or the
        whole gradient (an elementwise algorithm, no ``max_grad_norm``,
        ``skip_nonfinite=False``); others raise FailedPrecondition. Unlike ``step``, a
        request that fails midway leaves the chunks already applied updated (the
        tensors they belong to count the step); the error names what was wrong. A
        push seen before (``push_id``) is read, checked and acknowledged with no
        parameters back.
        """
        _check_datatype(return_datatype, "return datatype")
        if push_id is not None:
            push_id.check()
        t0 = time.perf_counter()
        # duplex changes state chunk by chunk, so it holds the state lock while it reads
        claimed = self.store.get(session_id)
        with claimed.intake, self._locked(session_id) as session:
            if session is not claimed:
                raise NotFound(f"session {session_id!r} was replaced during the request")
            opt = session.opt
            if self._in_rounds(session):
                raise FailedPrecondition(
                    f"session {session_id!r} averages the pushes of several workers (or is a "
                    "shard waiting for commits): send the step without apply_as_received")
            if not opt.streamable:
                raise FailedPrecondition(
                    f"session {session_id!r} cannot apply gradients as they arrive: it uses "
                    f"{'LAMB' if opt.algorithm.value == 'lamb' else 'whole-gradient checks'} "
                    "(needs an elementwise algorithm, no max_grad_norm and "
                    "skip_nonfinite=false); send the step without apply_as_received")
            on_host = opt.backend.name == "cpu"
            host = opt.grad if on_host else np.empty(opt.layout.size, opt.dtype)
            asm = _Assembler(session.opt.layout, host)
            if self._seen(session, push_id):
                for chunk in grads:
                    asm.add(chunk)
                asm.finish(require_all=False)
                yield StepResult(opt.step_count, False, None, (), duplicate=True)
                return
            stream = opt.begin_stream()
            try:
                for chunk in grads:
                    i, lo, hi = asm.add(chunk)
                    if not on_host:
                        opt.grad[lo:hi] = opt.backend.to_device(host[lo:hi])
                    stream.apply(i, lo, hi)
                    if return_datatype is not None:
                        values = opt.backend.to_host(opt.param[lo:hi])
                        yield TensorChunk(chunk.name, chunk.shape, return_datatype,
                                          encode(values, return_datatype), chunk.offset)
            finally:
                report = stream.finish()
                if stream.touched.any():  # applied, even if only in part: never again
                    session.version += 1
                    if push_id is not None:
                        session.pushes.record(push_id.worker, push_id.sequence)
            asm.finish(require_all=False)
        metrics.STEPS.inc()
        metrics.STEP_SECONDS.observe(time.perf_counter() - t0)
        yield StepResult(report.step, False, None, ())

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             timeout: float | None = None) -> builtins.list[TensorChunk]:
        """Parameter values; with ``min_step``, once the session has reached that step
        (waiting up to ``timeout`` seconds; Aborted if that step's round failed)."""
        _check_datatype(datatype, "datatype")
        timeout = MAX_WAIT if timeout is None else min(timeout, MAX_WAIT)
        if min_step < 0:
            raise InvalidArgument(f"min_step {min_step}: expected an integer >= 0")
        if timeout is not None and not timeout >= 0:
            raise InvalidArgument(f"timeout {timeout}: expected seconds >= 0")
        session = self.store.get(session_id)
        if min_step > session.opt.step_count:
            self._wait(session, lambda: session.opt.step_count >= min_step or bool(
                _round_failed(session, min_step)), timeout,
                f"step {min_step} of session {session_id!r}")
        with self._locked(session_id) as current:
            why = _round_failed(current, min_step) if current.opt.step_count < min_step else ""
            if why:
                raise Aborted(why)
            return self._encode(current, names, datatype)

    def _encode(self, session: Session, names: Sequence[str] | None,
                datatype: str) -> builtins.list[TensorChunk]:
        opt = session.opt
        layout = opt.layout
        if names:
            idx = []
            for n in names:
                try:
                    idx.append(layout.index(n))
                except KeyError:
                    raise InvalidArgument(f"tensor {n!r} is not in this session") from None
        else:
            idx = list(range(len(layout)))
        host = opt.backend.to_host(opt.param)
        out = []
        for i in idx:
            t = layout.tensors[i]
            out.append(TensorChunk(t.name, t.shape, datatype, encode(host[layout.span(i)],
                                                                     datatype)))
        return out

    def add_tensors(self, session_id: str, tensors: Sequence[TensorSpec],
                    group: Mapping[str, Any] | None = None,
                    initial: Iterable[TensorChunk] = ()) -> SessionInfo:
        """Add tensors to a live session, as torch's ``add_param_group``.

        ``group``: hyperparameters of a new group for them (their ``group`` index must
        be the new group's, i.e. the current number of groups); None: they join
        existing groups. Their step counts start at 0; values not sent start at zero.
        """
        session = self.store.get(session_id)
        # intake: the layout cannot change under us; the state stays unlocked while the
        # request (its initial values) is read and checked
        with session.intake:
            opt = session.opt
            try:
                check_tensors(replace(session.config, tensors=(*opt.layout.tensors, *tensors)))
                added = Layout(tuple(tensors))
                clash = {t.name for t in tensors} & {t.name for t in opt.layout.tensors}
                if clash:
                    raise ValueError(f"tensor names already in the session: "
                                     f"{', '.join(sorted(clash))}")
                new_slots = set(opt.slots_after_group(group)) - set(opt.slots)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            # the existing slots grow by the new tensors; a slot the new group turns on
            # (say amsgrad) spans the whole grown session
            extra = (slot_bytes(added.size, len(opt.slots), opt.dtype.itemsize)
                     + len(new_slots) * (opt.layout.size + added.size) * opt.dtype.itemsize)
            self.store.check_room(extra, session)  # before allocating anything
            host = np.zeros(added.size, dtype=opt.dtype)
            asm = _Assembler(added, host, scope="among the tensors being added")
            for chunk in initial:
                asm.add(chunk)
            if asm.bytes:
                asm.finish(require_all=False)
            with self._locked(session_id) as current:
                if current is not session:
                    raise NotFound(f"session {session_id!r} was replaced during the request")
                if session.round is not None:
                    raise FailedPrecondition(
                        f"session {session_id!r} has a round of pushes for step "
                        f"{session.round.step} open: add tensors between steps")
                self.store.check_room(extra, session)  # again: others may have grown
                try:
                    opt.add_tensors(tensors, host, group)
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
                except MemoryError:
                    raise ResourceExhausted(
                        f"session {session_id!r}: the device could not allocate {extra} more "
                        "bytes") from None
                session.config = replace(session.config, tensors=opt.layout.tensors,
                                         groups=tuple(dict(g) for g in opt.groups))
                session.acc = session.round_grad = None  # the rounds' buffers: old size
                session.version += 1
                info = _info(session)
        self._gauge()
        return info

    def set_parameters(self, session_id: str, values: Iterable[TensorChunk]) -> SessionInfo:
        """Overwrite the master weights of the tensors sent (whole tensors; others keep
        theirs); the optimizer state is kept, as when torch's parameters are changed in
        place between steps.

        While a round of pushes is open or staged, values equal to the session's are
        accepted and change nothing (every worker of a resumed job sends the weights
        it loaded), and other values are refused: a round's gradients were computed
        from the parameters it started with.
        """
        session = self.store.get(session_id)
        opt = session.opt
        layout = opt.layout
        # decoded into a buffer of its own, outside the lock: a slow upload holds up
        # no step; a refused request changes nothing
        host = np.empty(layout.size, opt.dtype)
        asm = _Assembler(layout, host)
        for chunk in values:
            asm.add(chunk)
        if not asm.seen.any():
            raise InvalidArgument("the request carries no parameter tensors")
        asm.finish(require_all=False)  # each tensor sent is whole
        sent = np.flatnonzero(asm.seen & (asm.received == np.diff(layout.offsets)))
        spans = [layout.span(int(i)) for i in sent]
        with self._locked(session_id) as current:
            if current is not session:
                raise NotFound(f"session {session_id!r} was replaced during the request")
            if layout is not opt.layout:
                raise FailedPrecondition(
                    f"the tensors of session {session_id!r} changed while these parameters "
                    "arrived: send them again")
            r = session.round
            if r is not None:
                params = opt.backend.to_host(opt.param)
                differ = [layout.tensors[int(i)].name for i, s in zip(sent, spans, strict=True)
                          if not np.array_equal(params[s], host[s])]
                if differ:
                    raise FailedPrecondition(
                        f"session {session_id!r} has a round of pushes for step {r.step} "
                        f"open: its parameters ({', '.join(differ[:8])}) can change between "
                        "steps, not while the round's gradients are computed from them")
                return _info(session)
            for s in spans:
                opt.param[s] = opt.backend.to_device(host[s])
            session.version += 1
            session.changed.notify_all()
            return _info(session)

    # -- hyperparameters and state -------------------------------------------

    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, Any]) -> SessionInfo:
        with self._locked(session_id) as session:
            _not_staged(session, "change hyperparameters")
            opt = session.opt
            try:
                new_slots = opt.slots_after(group, changes)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            grow = len(set(new_slots) - set(opt.slots))
            if grow:
                self.store.check_room(grow * opt.layout.size * opt.dtype.itemsize, session)
            opt.set_hyperparameters(group, changes)
            session.version += 1
            self._gauge()
            return _info(session)

    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None) -> SessionInfo:
        try:
            parsed = schedules.schedule_from_dict(schedule) if schedule else None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self._locked(session_id) as session:
            _not_staged(session, "change the schedule")
            session.opt.schedule = parsed
            session.version += 1
            return _info(session)

    def export_state(self, session_id: str) -> statedict.StateDict:
        with self._locked(session_id) as session:
            return statedict.export_state(session.opt)

    def import_state(self, session_id: str, state: Mapping[str, Any]) -> SessionInfo:
        with self._locked(session_id) as session:
            _not_staged(session, "import a state_dict")
            try:
                statedict.import_state(session.opt, state)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                    OverflowError) as exc:
                raise InvalidArgument(f"state_dict: {exc}") from None
            # a new timeline: pushes numbered by the steps of the old one are not its,
            # nor is a round of pushes computed from the old parameters
            session.pushes = PushLog()
            if session.round is not None:
                self._fail_round(session, session.round, (
                    f"the state of session {session_id!r} was replaced (a state_dict was "
                    "imported) before this step was applied: pull and push again"))
            session.version += 1
            session.changed.notify_all()
            return _info(session)

    # -- checkpoints ---------------------------------------------------------

    def checkpoint(self, session_id: str) -> CheckpointInfo:
        if self.checkpoints is None:
            raise FailedPrecondition("checkpoints are disabled: the server has no data directory")
        with self._locked(session_id) as session:
            return self._write(session)

    def list_checkpoints(self, session_id: str) -> builtins.list[int]:
        """Steps of the session's complete checkpoints on this server, oldest first."""
        self.store.get(session_id)
        return [] if self.checkpoints is None else self.checkpoints.steps(session_id)

    def restore_checkpoint(self, session_id: str, step: int) -> SessionInfo:
        """Roll the live session back to its checkpoint of ``step`` (for a sharded
        session: the newest step every shard holds); later checkpoints are removed."""
        if self.checkpoints is None:
            raise FailedPrecondition("checkpoints are disabled: the server has no data directory")
        old = self.store.get(session_id)
        with old.intake, self._locked(session_id) as current:
            if current is not old:
                raise NotFound(f"session {session_id!r} was replaced during the request")
            try:
                new = self.checkpoints.rewind(session_id, step, self.store.backend)
            except KeyError:
                raise NotFound(
                    f"session {session_id!r} has no complete checkpoint of step {step}; it has "
                    f"{self.checkpoints.steps(session_id) or 'none'}") from None
            new.checkpointed_at = time.monotonic()
            self.store.replace(old, new)
            old.deleted = True  # waiters on the old object stop
            old.restored_to = step
            old.changed.notify_all()
            log.info("session %s restored to its checkpoint of step %d", session_id, step)
        self._gauge()
        return _info(new)

    def _write(self, session: Session) -> CheckpointInfo:
        """Checkpoint ``session`` (its lock held, not deleted); durable on return."""
        assert self.checkpoints is not None
        if session.deleted:  # deleted or replaced by a restore: its files are not ours
            raise NotFound(f"session {session.id!r} does not exist")
        version = session.version
        info = self.checkpoints.write(session)
        session.checkpointed_version = version
        session.checkpointed_step = info.step
        session.checkpointed_at = time.monotonic()
        metrics.CHECKPOINTS.inc()
        return info

    def _auto_checkpoint(self, session: Session, report: StepReport) -> None:
        n = self.checkpoint_every_steps
        if self.checkpoints is not None and n > 0 and not report.skipped and report.step % n == 0:
            try:
                self._write(session)
            except Exception:
                # the step is applied and acknowledged; a failed automatic checkpoint
                # must not make the client think otherwise (and retry it)
                log.exception("automatic checkpoint of session %s failed", session.id)
                metrics.CHECKPOINT_FAILURES.inc()

    def checkpoint_due(self) -> int:
        """Checkpoint sessions whose last checkpoint is older than the time interval."""
        if self.checkpoints is None or self.checkpoint_every_seconds <= 0:
            return 0
        now = time.monotonic()
        n = 0
        for session in self.store.all():
            if now - session.checkpointed_at < self.checkpoint_every_seconds or not session.dirty:
                continue
            if not session.lock.acquire(timeout=0.1):
                continue  # busy stepping (or waiting on its client): next round
            try:
                if not session.deleted:
                    self._write(session)
                    n += 1
            except Exception:
                log.exception("periodic checkpoint of session %s failed", session.id)
                metrics.CHECKPOINT_FAILURES.inc()
            finally:
                session.lock.release()
        return n

    def checkpoint_all(self) -> int:
        """Checkpoint every session with unsaved steps (graceful shutdown)."""
        if self.checkpoints is None:
            return 0
        n = 0
        for session in self.store.all():
            with session.lock:
                if session.dirty and not session.deleted:
                    self._write(session)
                    n += 1
        return n
