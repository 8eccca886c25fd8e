"""OptimizerService: the operations both transports expose, on domain types only.

Orchestration and validation: every request is checked against the session's layout
before any state is touched (gradients are decoded into a buffer that is not state),
and only a complete, valid request reaches the session. The rules live below it: a
:class:`~adamserve.sessions.session.Session` keeps its invariants (the one way to
take one is :meth:`SessionStore.locked <adamserve.sessions.store.SessionStore.locked>`,
the one way to change one is ``session.changing()``), its
:class:`~adamserve.sessions.coordinator.RoundCoordinator` runs the rounds of several
workers, and :class:`~adamserve.sessions.checkpoint_policy.CheckpointPolicy` decides
when checkpoints are written. Errors are :mod:`adamserve.errors` exceptions whose
messages name the tensor and what was expected, each with a stable reason.

Same-host shared memory (``allow_shared_memory``): the regions clients register are
:mod:`adamserve.service.shared_memory`'s; a step that names them reads its gradients
from one and writes its parameters into another, through the same checks.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve import metrics
from adamserve.engine import schedules, statedict
from adamserve.engine.dtypes import WIRE_DTYPES, encode_buffer, itemsize
from adamserve.engine.optimizer import FlatOptimizer, Layout, StepReport, TensorSpec
from adamserve.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from adamserve.service import answers
from adamserve.service.access import LOCAL, Caller, audited
from adamserve.service.shared_memory import (
    Held,
    RegionInfo,
    RegionRef,
    SharedMemoryRegistry,
    write_values,
)
from adamserve.service.tensors import (
    Assembler,
    Rows,
    check_datatype,
    encode_params,
    encode_rows,
    initial_values,
    lazy,
    parse_rows,
    select_rows,
    sums,
)
from adamserve.service.types import SessionInfo, StepResult, TensorChunk, session_info
from adamserve.service.waits import Waits, bounded
from adamserve.sessions import meta, names
from adamserve.sessions.checkpoint_policy import CheckpointPolicy, Saved
from adamserve.sessions.checkpoints import CheckpointInfo, CheckpointStore
from adamserve.sessions.coordinator import Round, RoundState
from adamserve.sessions.pushlog import PushId, PushLog, as_pushes
from adamserve.sessions.rounds import Outcome
from adamserve.sessions.session import Session, SessionConfig, check_tensors, slot_bytes
from adamserve.sessions.store import SessionStore

log = logging.getLogger("adamserve.service")


class OptimizerService:
    def __init__(self, store: SessionStore, *, checkpoint_every_steps: int = 0,
                 checkpoint_every_seconds: float = 0.0,
                 allow_shared_memory: bool = False,
                 shared_memory: SharedMemoryRegistry | None = None) -> None:
        self.store = store
        self.allow_shared_memory = allow_shared_memory
        # the registered regions (a registry of its own: other limits, another directory)
        self.shared_memory = shared_memory or SharedMemoryRegistry()
        self.checkpoints: CheckpointStore | None = store.checkpoints
        self.policy = CheckpointPolicy(store.checkpoints, every_steps=checkpoint_every_steps,
                                       every_seconds=checkpoint_every_seconds)
        store.after_step = self.policy.after_step
        self.waits = Waits()
        self.ready = False

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

    @audited("CreateSession")
    def create(self, session_id: str, config: SessionConfig,
               initial: Iterable[TensorChunk] = (), *, caller: Caller = LOCAL) -> SessionInfo:
        """Create a session; tensors without initial values start at zero."""
        caller.require_write("CreateSession", session_id)
        session_id = caller.resolve(session_id)
        config = replace(config, tenant=names.split(session_id)[0])
        session = self.store.create(session_id, config)  # returned locked
        opt = session.opt
        try:
            host = initial_values(opt.layout, initial, opt.dtype)
            with session.changing():  # version 1: never checkpointed yet
                opt.param[...] = opt.backend.to_device(host)
        except BaseException:
            session.end()
            self.store.remove(session)
            raise
        finally:
            session.lock.release()
        self._gauge()
        log.info("created session %s: %s, %d tensors, %d elements", session_id,
                 config.algorithm, len(config.tensors), opt.layout.size)
        return session_info(session)

    def describe(self, session_id: str, *, caller: Caller = LOCAL) -> SessionInfo:
        session_id = caller.resolve(session_id)
        return session_info(self.store.get(session_id))

    def list(self, *, caller: Caller = LOCAL) -> builtins.list[SessionInfo]:
        """The caller's tenant's sessions; an admin's: every tenant's. A session whose
        description fails is left out (and logged), never failing the whole listing."""
        out = []
        for s in self.store.all(None if caller.admin else caller.tenant):
            try:
                out.append(session_info(s))
            except Exception:
                log.exception("session %s could not be described; left out of the listing",
                              s.id)
        return out

    @audited("DeleteSession")
    def delete(self, session_id: str, *, caller: Caller = LOCAL) -> None:
        caller.require_write("DeleteSession", session_id)
        session_id = caller.resolve(session_id)
        with self.store.locked(session_id) as session:
            # disk first: if the disk refuses, the session stays (Unavailable says why);
            # once its files are set aside no restart brings it back
            aside = (self.checkpoints.set_aside(session_id)
                     if self.checkpoints is not None else None)
            session.end()
            self.store.remove(session)
        self.policy.forget(session_id)
        if aside is not None and self.checkpoints is not None:
            self.checkpoints.remove_aside(aside)
        self._gauge()

    def check_request(self, session_id: str | None, *, write: str | None,
                      caller: Caller = LOCAL) -> None:
        """Refuse, before a request's body is read, what its call would refuse first: a
        change (``write``: the call's name) the caller's role may not make, a session
        (``session_id``) the caller does not have. Cheap: no lock is taken."""
        if write is not None:
            caller.require_write(write, session_id or "-")
        if session_id is not None:
            self.store.get(caller.resolve(session_id))

    # -- steps ---------------------------------------------------------------

    def step(self, session_id: str, grads: Iterable[TensorChunk], *,
             return_datatype: str | None = "FP32", require_all: bool = False,
             push_id: PushId | None = None, base_step: int | None = None,
             wait: float | None = None, gradients_region: RegionRef | None = None,
             gradients_datatype: str = "FP32", params_region: RegionRef | None = None,
             return_rows: bool = False, caller: Caller = LOCAL) -> StepResult:
        """Apply one update from ``grads``; tensors not sent are left as they are.

        A row-sparse gradient chunk carries some rows of its tensor; the others are
        zero (SparseAdam leaves them untouched). ``return_rows``: the tensors sent so
        come back as the rows sent only.

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

        Shared memory (regions of the caller's tenant): ``gradients_region`` holds the gradients
        of every tensor, packed in the session's order, as ``gradients_datatype`` (then
        ``grads`` must be empty); ``params_region`` receives the parameters after the
        step the same way, as ``return_datatype``, and the result carries none (a push
        ignores it). Both are held for the whole step.
        """
        caller.require_write("Step", session_id)
        session_id = caller.resolve(session_id)
        check_datatype(return_datatype, "return datatype")
        check_datatype(gradients_datatype, "gradients datatype")
        if push_id is not None:
            push_id.check()
        if base_step is not None and base_step < 0:
            raise InvalidArgument(f"base_step {base_step}: expected an integer >= 0")
        if return_datatype is None:
            params_region = None  # a push returns no parameters
        if gradients_region is None and params_region is None:
            return self._step(session_id, grads, return_datatype, require_all, push_id,
                              base_step, wait, return_rows=return_rows)
        registry = self._regions()
        session = self.store.get(session_id)
        if session.workers.exchange:
            # a shard's step is staged: its parameters come with the commit, which
            # takes no region
            raise FailedPrecondition(
                f"session {session_id!r} is one shard of a sharded session: its steps are "
                "staged for a commit, which takes no shared-memory region; step it over the "
                "wire", reason="SHARED_MEMORY_FORBIDDEN", metadata=meta(session_id))
        numel = session.opt.layout.size
        with contextlib.ExitStack() as regions:
            source = out = None
            if gradients_region is not None:
                if next(iter(grads), None) is not None:
                    raise InvalidArgument(
                        "the step names a gradients region and carries gradient chunks too: "
                        "send the gradients one way")
                source = regions.enter_context(registry.use(
                    gradients_region, numel * itemsize(gradients_datatype), caller.tenant,
                    "gradients_region", f"the session's {numel} elements as "
                    f"{gradients_datatype}"))
            if params_region is not None:
                assert return_datatype is not None
                out = regions.enter_context(registry.use(
                    params_region, numel * itemsize(return_datatype), caller.tenant,
                    "params_region", f"the session's {numel} elements as {return_datatype}"))
            source_grads = grads if source is None else _RegionGradients(source,
                                                                         gradients_datatype)
            return self._step(session_id, source_grads, return_datatype, require_all,
                              push_id, base_step, wait, out)

    def _step(self, session_id: str, grads: Iterable[TensorChunk] | _RegionGradients,
              return_datatype: str | None, require_all: bool, push_id: PushId | None,
              base_step: int | None, wait: float | None,
              out: Held | None = None, *, return_rows: bool = False) -> StepResult:
        """:meth:`step`, its arguments checked; ``out``: where the parameters go."""
        t0 = time.perf_counter()
        session = self.store.get(session_id)
        rounds = session.rounds
        with self.store.locked(session_id, session):  # refuse before reading the body
            rounds.expire()  # a round past its straggler timeout ends now, not with this push
            rounds.admit(push_id, base_step)
            multi = rounds.in_rounds()
        # One worker: its request is decoded into the session's gradient buffer, one at a
        # time (intake). Rounds: each push into a buffer of its own, so a worker whose
        # upload stalls holds up no other worker (nor the straggler timeout).
        waiting: Round | None = None
        opt = session.opt
        reserve = functools.partial(self.store.reserved, session_id)
        with contextlib.nullcontext() if multi else session.intake:
            on_cpu = opt.backend.name == "cpu"
            region = grads if isinstance(grads, _RegionGradients) else None
            # one worker, gradients in a region in the state's dtype: the engine reads
            # them there (no copy); the sums of squares are then the engine's
            in_place = region.in_place(opt) if region is not None and not multi else None
            own = in_place is None and (multi or not on_cpu)
            # a buffer of its own (and, on a device, the copy of it there) is counted
            # against the caps before it is allocated, and only until the push is in:
            # a worker waiting for its round holds none (the round's sum has it)
            nbytes = opt.layout.size * opt.dtype.itemsize * (1 if on_cpu else 2) if own else 0
            with reserve(nbytes):
                host = (in_place if in_place is not None
                        else np.empty(opt.layout.size, opt.dtype) if own else opt.grad)
                # rows not sent are zeroed, except where only the session's own step
                # reads this buffer and reads only the rows sent
                asm = Assembler(opt.layout, host, rows=True, lazy=lazy(opt) and not multi)
                sumsq: npt.NDArray[np.float64] | None = asm.sumsq
                if in_place is not None:
                    active, sumsq = np.ones(len(asm.layout), dtype=np.bool_), None
                else:
                    _decode(asm, grads)
                    active = asm.finish(require_all)
                sent_rows = asm.rows() if asm.row_sparse else None
                if sent_rows is not None and opt.algorithm.value == "muon":
                    raise InvalidArgument(
                        "Muon orthogonalises each matrix's whole update: send its gradients "
                        "dense, not row-sparse")
                rows = sent_rows if lazy(opt) else None
                with self.store.locked(session_id, session):
                    self._same_layout(session, asm.layout, "this push arrived: push again")
                    if asm.lazy and asm.row_sparse and rounds.in_rounds():
                        # decoded for a step of its own (rows not sent left as they were),
                        # but the session's pushes now go through rounds, which add them
                        raise FailedPrecondition(
                            f"the workers of session {session_id!r} changed while this push "
                            "arrived: push again", reason="WORKERS_CHANGED",
                            metadata=meta(session_id))
                    duplicate = session.seen(push_id, base_step)
                    staleness = rounds.admit(push_id, base_step)
                    # the params place, checked again before the step: a refusal changes
                    # nothing
                    if out is not None and return_datatype:
                        _check_out(out, session, asm.layout.size * itemsize(return_datatype))
                    if duplicate:
                        report = StepReport(opt.step_count, False, None)
                    elif rounds.in_rounds():  # added to the round's sum, not kept
                        waiting = rounds.arrive(host, active, push_id, return_datatype,
                                                reserve, rows=rows)
                    else:
                        report = self._apply(session, host, active, sumsq, push_id,
                                             rounds.lr_scale(staleness),
                                             intake=not multi and in_place is None, rows=rows)
                    if waiting is None:
                        params: list[TensorChunk] = []
                        if out is not None and return_datatype:
                            write_values(out.view, opt.backend.to_host(opt.param),
                                         return_datatype)
                        elif return_datatype:
                            params = encode_params(opt, None, return_datatype,
                                                   sent_rows if return_rows else None)
            received = asm.bytes  # for the session's history
            del host, asm  # given back: what follows may wait
        if waiting is not None:
            result = self._round_result(session, waiting, return_datatype, wait)
            session.history.traffic(waiting.step, received,
                                    sum(memoryview(c.data).nbytes for c in result.params))
            if return_rows and sent_rows is not None and result.params:
                result = replace(result, params=select_rows(result.params, opt.layout,
                                                            sent_rows))
            if out is not None and result.params:
                _write_chunks(out, result.params)
                result = replace(result, params=[])
            return result
        if not duplicate:
            seconds = time.perf_counter() - t0
            metrics.STEP_SECONDS.observe(seconds)
            session.history.traffic(report, received,
                                    sum(memoryview(c.data).nbytes for c in params), seconds)
        return StepResult(report.step, report.skipped, report.grad_norm, report.nonfinite, params,
                          duplicate, staleness=staleness, contributors=0 if duplicate else 1)

    @staticmethod
    def _same_layout(session: Session, layout: Layout, during: str) -> None:
        """Refuse a request decoded against tensors that add_tensors has changed since."""
        if layout is not session.opt.layout:
            raise FailedPrecondition(
                f"the tensors of session {session.id!r} changed while {during}",
                reason="LAYOUT_CHANGED", metadata=meta(session.id))

    @staticmethod
    def _apply(session: Session, host: npt.NDArray[Any], active: npt.NDArray[np.bool_],
               sumsq: npt.NDArray[np.float64] | None, push_id: PushId | None,
               lr_scale: float = 1.0, *, intake: bool = True,
               rows: Rows | None = None) -> StepReport:
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
                          grad=grad, rows=rows)
        session.record_step(report, as_pushes(push_id))
        return report

    # -- rounds (several workers, or a shard's two-phase step) ---------------------------

    def _round_result(self, session: Session, r: Round, return_datatype: str | None,
                      wait: float | None = None) -> StepResult:
        """What a push into round ``r`` answers: at once for a plain push; otherwise once
        the round is applied (or staged, for an exchange session)."""
        exchange = session.workers.exchange
        if return_datatype is None and not exchange:
            with session.lock:
                if r.state is RoundState.OPEN:  # the round it joined, for its commit or pull
                    return StepResult(session.opt.step_count, False, None, (), pending=True,
                                      round=r.id)
        try:
            self.waits.wait(session, lambda: r.state is not RoundState.OPEN, bounded(wait),
                            f"step {r.step} (its round has {r.arrived} of "
                            f"{session.workers.count} pushes; this one stays in it: send it "
                            "again to wait again)")
            with self.store.locked(session.id, session):
                if exchange and r.state is not RoundState.FAILED and r.grad_sumsq is not None:
                    # the push's answer is its round's sums, even when another worker's
                    # commit has applied the step since: this worker's commit then gets
                    # the outcome, as every later commit does
                    return answers.staged_sums(r)
                return answers.answer(session, r, return_datatype)
        finally:
            if return_datatype is not None:
                with session.lock:
                    r.collected(return_datatype)

    def commit(self, session_id: str, step: int, tensor_sumsq: Sequence[float],
               total_sumsq: float, *, param_sumsq: Sequence[float] = (),
               update_sumsq: Sequence[float] = (), round_id: int = 0,
               return_datatype: str | None = "FP32", caller: Caller = LOCAL) -> StepResult:
        """Apply the staged step ``step`` of an exchange session (one shard of a model)
        with sums of squares over the whole model (see ``docs/exchange.md``).

        ``tensor_sumsq``: per tensor of this session, the gradient's sum of squares over
        the whole tensor it is part of; ``total_sumsq``: over the whole gradient. For
        LAMB, this first commit returns the parameter and update sums of squares of
        this shard (``pending``); a second commit brings their whole-tensor totals in
        ``param_sumsq`` and ``update_sumsq``. ``round_id``: the round the push's answer
        named (0: whichever is staged for ``step``). A commit repeated (by another
        worker, or a retry) after the step was applied returns its outcome again.
        """
        caller.require_write("Commit", session_id)
        session_id = caller.resolve(session_id)
        check_datatype(return_datatype, "return datatype")
        if not (total_sumsq >= 0 or math.isnan(total_sumsq)):
            raise InvalidArgument(f"total_sumsq {total_sumsq}: a sum of squares is >= 0")
        session = self.store.get(session_id)
        with self.store.locked(session_id, session):
            opt = session.opt
            r = session.rounds.for_commit(step, round_id)
            if isinstance(r, Outcome):  # committed already: its outcome again
                return answers.answer(session, r, return_datatype)
            nseg = len(opt.layout)
            tensor_sums = sums("tensor_sumsq", tensor_sumsq, nseg)
            if bool(param_sumsq) != bool(update_sumsq):
                raise InvalidArgument("param_sumsq and update_sumsq come together (LAMB's "
                                      "second commit)")
            if param_sumsq and opt.algorithm.value != "lamb":
                raise InvalidArgument(f"param_sumsq: session {session_id!r} runs "
                                      f"{opt.algorithm.value}; only LAMB takes a second commit")
            if param_sumsq:
                if r.state is not RoundState.LAMB:
                    raise FailedPrecondition(
                        f"commit of step {step}: LAMB's second commit (param_sumsq) came "
                        "before the first (tensor_sumsq only)", reason="COMMIT_OUT_OF_ORDER",
                        metadata=meta(session_id, step=step))
                psq = sums("param_sumsq", param_sumsq, nseg, finite=True)
                usq = sums("update_sumsq", update_sumsq, nseg, finite=True)
                session.rounds.commit_lamb(r, psq, usq)
            elif r.state is RoundState.STAGED:  # else LAMB's first commit again
                session.rounds.commit(r, tensor_sums, float(total_sumsq))
            return answers.answer(session, r, return_datatype)

    def set_workers(self, session_id: str, count: int, *, caller: Caller = LOCAL) -> SessionInfo:
        """Change the number of workers of a live session (workers joined or left).

        A round that already has ``count`` pushes closes at once."""
        caller.require_write("SetWorkers", session_id)
        session_id = caller.resolve(session_id)
        session = self.store.get(session_id)
        with self.store.locked(session_id, session):
            r = session.round
            if session.workers.exchange and r is not None and r.pushes:
                # each shard would close its round with whichever pushes it holds
                raise FailedPrecondition(
                    f"session {session_id!r} is a shard with a round of {r.arrived} pushes "
                    f"open for step {r.step}: change the number of workers between steps",
                    reason="ROUND_OPEN", metadata=meta(session_id, step=r.step))
            workers = replace(session.workers, count=count)
            try:
                workers.check()
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            with session.changing():
                session.config = replace(session.config, workers=workers)
            session.rounds.workers_changed()
            return session_info(session)

    def expire_rounds(self) -> int:
        """End the rounds past their straggler timeout now, also those nobody waits on
        (workers that push and pull later); returns how many. Run every fraction of a
        second by the server."""
        n = 0
        now = time.monotonic()
        for session in self.store.all():
            deadline = session.rounds.deadline()
            if deadline is None or now < deadline:
                continue
            with session.lock:
                n += session.rounds.expire()
        return n

    # -- same-host shared memory ---------------------------------------------------------

    def _regions(self) -> SharedMemoryRegistry:
        if not self.allow_shared_memory:
            raise FailedPrecondition(
                "this server does not take shared-memory regions (start it with "
                "--allow-shared-memory)", reason="SHARED_MEMORY_DISABLED")
        return self.shared_memory

    def register_shared_memory(self, name: str, key: str, byte_size: int, *, caller: Caller = LOCAL) -> RegionInfo:
        """Map ``byte_size`` bytes of the POSIX shared-memory object ``key`` (under
        /dev/shm on this host) as the region ``name`` of the caller's tenant; the same
        registration again returns it (a retry)."""
        caller.require_write("RegisterSharedMemory", name)
        return self._regions().register(name, key, byte_size, caller.tenant)

    def unregister_shared_memory(self, name: str, *, caller: Caller = LOCAL) -> None:
        """Drop a region; a step using it finishes first, later ones are refused."""
        caller.require_write("UnregisterSharedMemory", name)
        self._regions().unregister(name, caller.tenant)

    def list_shared_memory(self, *, caller: Caller = LOCAL) -> builtins.list[RegionInfo]:
        """The regions of the caller's tenant, ordered by name."""
        return self._regions().list(caller.tenant)

    def sweep_shared_memory(self) -> int:
        """Drop the regions whose object is gone (the client unlinked it, or exited) or
        that no step used for a while; returns how many. Run every fraction of a second
        by the server, beside :meth:`expire_rounds`."""
        return self.shared_memory.sweep() if self.allow_shared_memory else 0

    def step_stream(self, session_id: str, grads: Iterable[TensorChunk], *,
                    return_datatype: str | None = "FP32", push_id: PushId | None = None, caller: Caller = LOCAL) -> Iterator[TensorChunk | StepResult]:
        """Full duplex: apply each gradient chunk as it arrives and yield its updated
        parameters at once; the :class:`StepResult` comes last.

        Only for sessions whose step needs nothing computed over a whole tensor or the
        whole gradient (an elementwise algorithm, no ``max_grad_norm``,
        ``skip_nonfinite=False``); others raise FailedPrecondition (NOT_STREAMABLE). Unlike ``step``, a
        request that fails midway leaves the chunks already applied updated (the
        tensors they belong to count the step); the error names what was wrong. A
        push seen before (``push_id``) is read, checked and acknowledged with no
        parameters back.
        """
        caller.require_write("Step", session_id)
        session_id = caller.resolve(session_id)
        check_datatype(return_datatype, "return datatype")
        if push_id is not None:
            push_id.check()
        t0 = time.perf_counter()
        # duplex changes state chunk by chunk, so it holds the state lock while it reads
        claimed = self.store.get(session_id)
        # on a device, a host buffer of the session's size, counted before it is allocated
        nbytes = (0 if claimed.opt.backend.name == "cpu"
                  else claimed.opt.layout.size * claimed.opt.dtype.itemsize)
        with claimed.intake, self.store.reserved(session_id, nbytes), \
                self.store.locked(session_id, claimed) as session:
            opt = session.opt
            if session.rounds.in_rounds():
                raise FailedPrecondition(
                    f"session {session_id!r} averages the pushes of several workers (or is a "
                    "shard waiting for commits): send the step without apply_as_received",
                    reason="NOT_STREAMABLE", metadata=meta(session_id))
            if not opt.streamable:
                raise FailedPrecondition(
                    f"session {session_id!r} cannot apply gradients as they arrive: it uses "
                    f"{'LAMB' if opt.algorithm.value == 'lamb' else 'whole-gradient checks'} "
                    "(needs an elementwise algorithm, no max_grad_norm and "
                    "skip_nonfinite=false); send the step without apply_as_received",
                    reason="NOT_STREAMABLE", metadata=meta(session_id))
            on_host = opt.backend.name == "cpu"
            host = opt.grad if on_host else np.empty(opt.layout.size, opt.dtype)
            asm = Assembler(session.opt.layout, host)
            if session.seen(push_id):
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
                                          encode_buffer(values, return_datatype), chunk.offset)
            finally:
                report = stream.finish()
                if stream.touched.any():  # applied, even if only in part: never again
                    session.record_step(report, as_pushes(push_id))
            asm.finish(require_all=False)
        metrics.STEP_SECONDS.observe(time.perf_counter() - t0)
        yield StepResult(report.step, False, None, ())

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             timeout: float | None = None,
             rows: Sequence[tuple[str, bytes | memoryview]] = (),
             caller: Caller = LOCAL) -> builtins.list[TensorChunk]:
        """Parameter values; with ``min_step``, once the session has reached that step
        (waiting up to ``timeout`` seconds; Aborted if that step's round failed).
        ``rows``: (tensor, int64 little-endian row indices) pairs, returned as
        row-sparse chunks after the whole tensors of ``names`` (none without names)."""
        session_id = caller.resolve(session_id)
        check_datatype(datatype, "datatype")
        timeout = bounded(timeout)
        if min_step < 0:
            raise InvalidArgument(f"min_step {min_step}: expected an integer >= 0")
        if not timeout >= 0:
            raise InvalidArgument(f"timeout {timeout}: expected seconds >= 0")
        session = self.store.get(session_id)
        if min_step > session.opt.step_count:
            self.waits.wait(session, lambda: session.opt.step_count >= min_step or bool(
                session.rounds.failed(min_step)), timeout,
                f"step {min_step} of session {session_id!r}")
        with self.store.locked(session_id) as current:
            why = current.rounds.failed(min_step) if current.opt.step_count < min_step else ""
            if why:
                raise Aborted(why, reason="ROUND_ABORTED", metadata=meta(session_id,
                                                                         step=min_step))
            picked = parse_rows(current.opt.layout, rows)
            whole = encode_params(current.opt, names, datatype) if names or not rows else []
            return whole + encode_rows(current.opt, picked, datatype)

    # -- tensors and parameters ------------------------------------------------

    def add_tensors(self, session_id: str, tensors: Sequence[TensorSpec],
                    group: Mapping[str, Any] | None = None,
                    initial: Iterable[TensorChunk] = (), *, caller: Caller = LOCAL) -> SessionInfo:
        """Add tensors to a live session, as torch's ``add_param_group``.

        ``group``: hyperparameters of a new group for them (their ``group`` index must
        be the new group's, i.e. the current number of groups); None: they join
        existing groups. Their step counts start at 0; values not sent start at zero.
        """
        caller.require_write("AddTensors", session_id)
        session_id = caller.resolve(session_id)
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
            extra = (slot_bytes(added.size, len(opt.slots), opt.dtype.itemsize, len(added))
                     + len(new_slots) * (opt.layout.size + added.size) * opt.dtype.itemsize)
            self.store.check_room(extra, session)  # the per-session cap
            # the growth and the initial values' buffer, counted before either is
            # allocated: checked and counted at once, so of two requests that would each
            # fit alone the second is refused
            with self.store.reserved(session_id, extra + added.size * opt.dtype.itemsize):
                host = initial_values(added, initial, opt.dtype,
                                      scope="among the tensors being added")
                with self.store.locked(session_id, session):
                    r = session.round
                    if r is not None:
                        raise FailedPrecondition(
                            f"session {session_id!r} has a round of pushes for step "
                            f"{r.step} open: add tensors between steps",
                            reason="ROUND_OPEN", metadata=meta(session_id, step=r.step))
                    with session.changing():
                        try:
                            opt.add_tensors(tensors, host, group)
                        except ValueError as exc:
                            raise InvalidArgument(str(exc)) from None
                        except MemoryError:
                            raise ResourceExhausted(
                                f"session {session_id!r}: the device could not allocate "
                                f"{extra} more bytes", reason="DEVICE_OUT_OF_MEMORY",
                                metadata=meta(session_id)) from None
                        session.config = replace(session.config, tensors=opt.layout.tensors,
                                                 groups=tuple(dict(g) for g in opt.groups))
                        session.rounds.layout_changed()
                    info = session_info(session)
        self._gauge()
        return info

    def set_parameters(self, session_id: str, values: Iterable[TensorChunk], *, caller: Caller = LOCAL) -> SessionInfo:
        """Overwrite the master weights of the tensors sent (whole tensors; others keep
        theirs); the optimizer state is kept, as when torch's parameters are changed in
        place between steps.

        While a round of pushes is open or staged, values equal to the session's are
        accepted and change nothing (every worker of a resumed job sends the weights
        it loaded), and other values are refused: a round's gradients were computed
        from the parameters it started with.
        """
        caller.require_write("SetParameters", session_id)
        session_id = caller.resolve(session_id)
        session = self.store.get(session_id)
        opt = session.opt
        layout = opt.layout
        # decoded into a buffer of its own, outside the lock: a slow upload holds up
        # no step; a refused request changes nothing. It is counted against the caps
        # whole before it is allocated (which tensors come is known only as they do)
        with self.store.reserved(session_id, layout.size * opt.dtype.itemsize):
            host = np.empty(layout.size, opt.dtype)
            return self._set_values(session, host, values)

    def _set_values(self, session: Session, host: npt.NDArray[Any],
                    values: Iterable[TensorChunk]) -> SessionInfo:
        """:meth:`set_parameters` with its buffer counted: ``values`` decoded into
        ``host``, then written into the session."""
        session_id = session.id
        opt = session.opt
        layout = opt.layout
        asm = Assembler(layout, host)
        for chunk in values:
            asm.add(chunk)
        if not asm.seen.any():
            raise InvalidArgument("the request carries no parameter tensors")
        asm.finish(require_all=False)  # each tensor sent is whole
        sent = np.flatnonzero(asm.seen & (asm.received == np.diff(layout.offsets)))
        spans = [layout.span(int(i)) for i in sent]
        with self.store.locked(session_id, session):
            self._same_layout(session, layout, "these parameters arrived: send them again")
            r = session.round
            if r is not None:
                # only the tensors sent are compared (and copied from the device)
                differ = [layout.tensors[int(i)].name for i, s in zip(sent, spans, strict=True)
                          if not np.array_equal(opt.backend.to_host(opt.param[s]), host[s])]
                if differ:
                    raise FailedPrecondition(
                        f"session {session_id!r} has a round of pushes for step {r.step} "
                        f"{'staged for its commit' if r.staged else 'open'}: its parameters "
                        f"({', '.join(differ[:8])}) can change between steps, not while the "
                        "round's gradients are computed from them",
                        reason="STEP_STAGED" if r.staged else "ROUND_OPEN",
                        metadata=meta(session_id, step=r.step))
                return session_info(session)
            session.rounds.keep_answers(lambda datatype: encode_params(opt, None, datatype))
            with session.changing():
                for s in spans:
                    opt.param[s] = opt.backend.to_device(host[s])
            return session_info(session)

    # -- hyperparameters and state -------------------------------------------

    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, Any], *, caller: Caller = LOCAL) -> SessionInfo:
        caller.require_write("SetHyperparameters", session_id)
        session_id = caller.resolve(session_id)
        with self.store.locked(session_id) as session:
            session.rounds.refuse_if_staged("change hyperparameters")
            opt = session.opt
            try:
                new_slots = opt.slots_after(group, changes)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            grow = len(set(new_slots) - set(opt.slots))
            if grow:
                self.store.check_room(grow * opt.layout.size * opt.dtype.itemsize, session)
            if "train_mode" in changes:  # schedule-free: moves the parameters (y <-> x)
                r = session.round
                if r is not None:
                    raise FailedPrecondition(
                        f"session {session_id!r} has a round of pushes for step {r.step} "
                        "open: switch train_mode between steps, not while the round's "
                        "gradients are computed from the parameters",
                        reason="ROUND_OPEN", metadata=meta(session_id, step=r.step))
                session.rounds.keep_answers(lambda datatype: encode_params(opt, None, datatype))
            with session.changing():
                opt.set_hyperparameters(group, changes)
            self._gauge()
            return session_info(session)

    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None, *, caller: Caller = LOCAL) -> SessionInfo:
        caller.require_write("SetSchedule", session_id)
        session_id = caller.resolve(session_id)
        try:
            parsed = schedules.schedule_from_dict(schedule) if schedule else None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self.store.locked(session_id) as session, session.changing():
            session.rounds.refuse_if_staged("change the schedule")
            session.opt.schedule = parsed
            return session_info(session)

    def export_state(self, session_id: str, *, caller: Caller = LOCAL,
                     native: bool = False) -> statedict.StateDict:
        """The torch-format state_dict (``native``: the moments as the session stores
        them, :func:`statedict.export_state`)."""
        session_id = caller.resolve(session_id)
        with self.store.locked(session_id) as session:
            return statedict.export_state(session.opt, native=native)

    @audited("ImportState")
    def import_state(self, session_id: str, state: Mapping[str, Any], *, caller: Caller = LOCAL) -> SessionInfo:
        caller.require_write("ImportState", session_id)
        session_id = caller.resolve(session_id)
        with self.store.locked(session_id) as session, session.changing():
            session.rounds.refuse_if_staged("import a state_dict")
            try:
                statedict.import_state(session.opt, state)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                    OverflowError) as exc:
                raise InvalidArgument(f"state_dict: {exc}") from None
            # a new timeline: pushes numbered by the steps of the old one are not its,
            # nor is a round of pushes computed from the old parameters
            session.pushes = PushLog()
            session.rounds.fail_current(
                f"the state of session {session_id!r} was replaced (a state_dict was "
                "imported) before this step was applied: pull and push again")
            return session_info(session)

    # -- checkpoints (when: self.policy) -----------------------------------------

    @audited("Checkpoint")
    def checkpoint(self, session_id: str, *, caller: Caller = LOCAL) -> CheckpointInfo:
        caller.require_write("Checkpoint", session_id)
        session_id = caller.resolve(session_id)
        self.policy.require()
        with self.store.locked(session_id) as session:
            info = self.policy.write(session)
        return replace(info, session_id=names.shown(info.session_id, caller.tenant))

    def list_checkpoints(self, session_id: str, *, caller: Caller = LOCAL) -> builtins.list[int]:
        """Steps of the session's complete checkpoints on this server, oldest first."""
        session_id = caller.resolve(session_id)
        self.store.get(session_id)
        return [] if self.checkpoints is None else self.checkpoints.steps(session_id)

    @audited("RestoreCheckpoint")
    def restore_checkpoint(self, session_id: str, step: int, *, caller: Caller = LOCAL) -> SessionInfo:
        """Roll the live session back to its checkpoint of ``step`` (for a sharded
        session: the newest step every shard holds); later checkpoints are removed."""
        caller.require_write("RestoreCheckpoint", session_id)
        session_id = caller.resolve(session_id)
        checkpoints = self.policy.require()
        old = self.store.get(session_id)
        with old.intake, self.store.locked(session_id, old):
            try:
                new = checkpoints.rewind(session_id, step, self.store.backend)
            except KeyError:
                raise NotFound(
                    f"session {session_id!r} has no complete checkpoint of step {step}; it has "
                    f"{checkpoints.steps(session_id) or 'none'}", reason="CHECKPOINT_NOT_FOUND",
                    metadata=meta(session_id, step=step)) from None
            self.store.replace(old, new)
            old.end(restored_to=step)  # waiters on the old object stop
            log.info("session %s restored to its checkpoint of step %d", session_id, step)
        self._gauge()
        return session_info(new)

    def holding(self, session_id: str, nbytes: int, *, caller: Caller = LOCAL
                ) -> contextlib.AbstractContextManager[None]:
        """Count ``nbytes`` a transport buffers for a request on ``session_id`` (an
        imported blob) against the memory caps while the block runs
        (ResourceExhausted, before it is kept, when they do not fit)."""
        return self.store.reserved(caller.resolve(session_id), nbytes)

    def checkpoint_due(self) -> int:
        """Checkpoint sessions whose last checkpoint is older than the time interval."""
        return self.policy.due(self.store.all())

    def checkpoint_all(self) -> Saved:
        """Checkpoint every session with unsaved steps (graceful shutdown): each is
        tried; the result names those saved and those the disk refused."""
        return self.policy.on_stop(self.store.all())


class _RegionGradients:
    """The gradients in a held region, fed to an :class:`Assembler` as one chunk per
    tensor of its layout (so every check and the sums of squares are the chunks')."""

    def __init__(self, held: Held, datatype: str) -> None:
        self.held = held
        self.datatype = datatype

    def _fits(self, layout: Layout) -> memoryview:
        size = itemsize(self.datatype)
        view = self.held.view
        if len(view) != layout.size * size:  # add_tensors ran since the sizes were checked
            raise FailedPrecondition(
                f"the tensors of the session changed while this push arrived: its gradients "
                f"are {layout.size * size} bytes now, not {len(view)}; push again",
                reason="LAYOUT_CHANGED")
        return view

    def in_place(self, opt: FlatOptimizer) -> npt.NDArray[Any] | None:
        """The gradients as an array over the region, where the engine may read them
        there: the CPU backend, the state's own dtype, and an algorithm that only reads
        its gradient (LAMB writes its update over it). None: decode them (:meth:`feed`)."""
        if (opt.backend.name != "cpu" or WIRE_DTYPES[self.datatype] != opt.dtype
                or opt.algorithm.value == "lamb"):
            return None
        return np.frombuffer(self._fits(opt.layout), dtype=opt.dtype)

    def feed(self, asm: Assembler) -> None:
        layout = asm.layout
        size = itemsize(self.datatype)
        view = self._fits(layout)
        offsets = layout.offsets
        for i, t in enumerate(layout.tensors):
            lo, hi = int(offsets[i]) * size, int(offsets[i + 1]) * size
            asm.add(TensorChunk(t.name, t.shape, self.datatype, view[lo:hi]))


def _decode(asm: Assembler, grads: Iterable[TensorChunk] | _RegionGradients) -> None:
    """Every chunk of ``grads`` into ``asm``, in a frame of its own: no chunk (nor the
    received message it is a view of) outlives it while the step goes on to wait."""
    if isinstance(grads, _RegionGradients):
        grads.feed(asm)
        return
    for chunk in grads:
        asm.add(chunk)


def _check_out(out: Held, session: Session, nbytes: int) -> None:
    """The params place still fits the session (add_tensors may have run since it was
    checked) and its object was not truncated below it."""
    if len(out.view) != nbytes:
        raise FailedPrecondition(
            f"the tensors of session {session.id!r} changed while this step arrived: its "
            f"parameters are {nbytes} bytes now, not {len(out.view)}; step again",
            reason="LAYOUT_CHANGED", metadata=meta(session.id))
    out.check("params_region")


def _write_chunks(out: Held, chunks: Sequence[TensorChunk]) -> None:
    """Whole tensors' encoded parameters, in session order, into the region ``out``
    (their sizes are the session's, checked before the step)."""
    out.check("params_region")
    pos = 0
    view = out.view
    for c in chunks:
        data = memoryview(c.data).cast("B")
        view[pos:pos + data.nbytes] = data
        pos += data.nbytes
