"""When checkpoints are written: every trigger in one place.

* on request (:meth:`CheckpointPolicy.write`: the Checkpoint call),
* every N steps (:meth:`CheckpointPolicy.after_step`, run by every applied step, under
  the session's lock, so shards with the same N checkpoint at the same steps),
* every S seconds (:meth:`CheckpointPolicy.due`, called every :attr:`period` seconds by
  the server's timer), for sessions with unsaved changes,
* on stop (:meth:`CheckpointPolicy.on_stop`: every session with unsaved changes).

The automatic triggers never fail a request: the step stands (in memory) and a failed
write is counted (``adamserve_checkpoint_failures_total``) and logged once per session
until one of its checkpoints succeeds again, not once per step; the sessions failing now
are the ``adamserve_checkpoint_failing_sessions`` gauge. On stop every session is tried,
whatever failed before it, and the result names those that could not be saved. The files
themselves are :mod:`adamserve.sessions.checkpoints`'.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from adamserve import metrics
from adamserve.engine.optimizer import StepReport
from adamserve.errors import FailedPrecondition, NotFound, ServiceError
from adamserve.sessions import meta
from adamserve.sessions.checkpoints import CheckpointInfo, CheckpointStore
from adamserve.sessions.session import Session

log = logging.getLogger("adamserve.checkpoints")


# How long the on-stop checkpoint waits for a session a request is holding.
STOP_LOCK_WAIT = 10.0


@dataclass(frozen=True)
class Saved:
    """What a checkpoint of every session with unsaved changes did (on stop)."""

    saved: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)  # session id -> why


class CheckpointPolicy:
    def __init__(self, checkpoints: CheckpointStore | None, *, every_steps: int = 0,
                 every_seconds: float = 0.0) -> None:
        self.checkpoints = checkpoints
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        # sessions whose last checkpoint failed: logged once until one succeeds
        self._failing: set[str] = set()
        self._failing_lock = threading.Lock()  # writes of different sessions run at once

    @property
    def period(self) -> float | None:
        """How often the server's timer should call :meth:`due` (None: never)."""
        if self.checkpoints is None or self.every_seconds <= 0:
            return None
        return min(1.0, self.every_seconds / 4)

    def require(self) -> CheckpointStore:
        """The checkpoint files, or the refusal of a server without a data directory."""
        if self.checkpoints is None:
            raise FailedPrecondition("checkpoints are disabled: the server has no data directory",
                                     reason="CHECKPOINTS_DISABLED")
        return self.checkpoints

    def write(self, session: Session, kind: str = "requested") -> CheckpointInfo:
        """Checkpoint ``session`` now (its lock held); durable on return. A failure
        (Unavailable: the disk refused) changes nothing in memory."""
        store = self.require()
        if session.deleted:  # deleted or replaced by a restore: its files are not ours
            raise NotFound(f"session {session.id!r} does not exist", reason="SESSION_NOT_FOUND",
                           metadata=meta(session.id))
        version = session.version
        try:
            info = store.write(session)
        except Exception as exc:
            self._failed(session.id, kind, exc, always=kind == "on-stop")
            raise
        session.checkpointed(info.step, version)
        metrics.CHECKPOINTS.inc()
        self._succeeded(session.id)
        return info

    def after_step(self, session: Session, report: StepReport) -> None:
        """Every N steps (lock held): the step is applied and acknowledged whatever
        happens here; a failed write must not make the client think otherwise (and
        retry it)."""
        n = self.every_steps
        if self.checkpoints is None or n <= 0 or report.skipped or report.step % n:
            return
        self._quietly(session, "automatic")

    def due(self, sessions: Iterable[Session]) -> int:
        """Every S seconds: sessions with unsaved changes whose last checkpoint is older;
        one busy stepping (or waiting on its client) is left for the next call."""
        if self.period is None:
            return 0
        now = time.monotonic()
        n = 0
        for session in sessions:
            if now - session.checkpointed_at < self.every_seconds or not session.dirty:
                continue
            if not session.lock.acquire(timeout=0.1):
                continue
            try:
                n += not session.deleted and self._quietly(session, "periodic")
            finally:
                session.lock.release()
        return n

    def on_stop(self, sessions: Iterable[Session]) -> Saved:
        """Graceful shutdown: every session with unsaved changes, each tried whatever
        happened to the others; each failure is logged."""
        if self.checkpoints is None:
            return Saved()
        saved: list[str] = []
        failed: dict[str, str] = {}
        for session in sessions:
            # a request may hold the lock while its client sends nothing: never let one
            # stall the shutdown of every other session
            if not session.lock.acquire(timeout=STOP_LOCK_WAIT):
                failed[session.id] = (f"a request held the session for over {STOP_LOCK_WAIT:g} "
                                      "s; not saved")
                log.error("on-stop checkpoint of session %s skipped: %s", session.id,
                          failed[session.id])
                continue
            try:
                if not session.dirty or session.deleted:
                    continue
                try:
                    self.write(session, "on-stop")
                except Exception as exc:
                    failed[session.id] = str(exc) if isinstance(exc, ServiceError) else repr(exc)
                    continue
                saved.append(session.id)
            finally:
                session.lock.release()
        return Saved(tuple(saved), failed)

    def forget(self, session_id: str) -> None:
        """A deleted session fails no more."""
        with self._failing_lock:
            self._failing.discard(session_id)
            metrics.CHECKPOINT_FAILING_SESSIONS.set(len(self._failing))

    def failing(self) -> list[str]:
        """The sessions whose last checkpoint failed."""
        with self._failing_lock:
            return sorted(self._failing)

    def _quietly(self, session: Session, kind: str) -> bool:
        try:
            self.write(session, kind)
        except Exception:  # logged and counted by write
            return False
        return True

    def _failed(self, session_id: str, kind: str, exc: Exception, *, always: bool) -> None:
        metrics.CHECKPOINT_FAILURES.inc()
        with self._failing_lock:
            first = session_id not in self._failing
            self._failing.add(session_id)
            metrics.CHECKPOINT_FAILING_SESSIONS.set(len(self._failing))
        if not (first or always):
            return
        more = "" if always else "; not logged again until one of its checkpoints succeeds"
        if isinstance(exc, ServiceError):  # the disk refused: its message says all
            log.error("%s checkpoint of session %s failed: %s%s", kind, session_id, exc, more)
        else:
            log.error("%s checkpoint of session %s failed%s", kind, session_id, more,
                      exc_info=exc)

    def _succeeded(self, session_id: str) -> None:
        with self._failing_lock:
            if session_id not in self._failing:
                return
            self._failing.discard(session_id)
            metrics.CHECKPOINT_FAILING_SESSIONS.set(len(self._failing))
        log.info("checkpoints of session %s succeed again", session_id)
