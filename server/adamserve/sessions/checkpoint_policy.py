"""When checkpoints are written: every trigger in one place.

* on request (:meth:`CheckpointPolicy.write`: the Checkpoint call),
* every N steps (:meth:`CheckpointPolicy.after_step`, run by every applied step, under
  the session's lock, so shards with the same N checkpoint at the same steps),
* every S seconds (:meth:`CheckpointPolicy.due`, called every :attr:`period` seconds by
  the server's timer), for sessions with unsaved changes,
* on stop (:meth:`CheckpointPolicy.on_stop`: every session with unsaved changes).

The automatic triggers never fail a request: a failed write is logged and counted.
The files themselves are :mod:`adamserve.sessions.checkpoints`'.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from adamserve import metrics
from adamserve.engine.optimizer import StepReport
from adamserve.errors import FailedPrecondition, NotFound
from adamserve.sessions import meta
from adamserve.sessions.checkpoints import CheckpointInfo, CheckpointStore
from adamserve.sessions.session import Session

log = logging.getLogger("adamserve.checkpoints")


class CheckpointPolicy:
    def __init__(self, checkpoints: CheckpointStore | None, *, every_steps: int = 0,
                 every_seconds: float = 0.0) -> None:
        self.checkpoints = checkpoints
        self.every_steps = every_steps
        self.every_seconds = every_seconds

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

    def write(self, session: Session) -> CheckpointInfo:
        """Checkpoint ``session`` now (its lock held); durable on return."""
        store = self.require()
        if session.deleted:  # deleted or replaced by a restore: its files are not ours
            raise NotFound(f"session {session.id!r} does not exist", reason="SESSION_NOT_FOUND",
                           metadata=meta(session.id))
        version = session.version
        info = store.write(session)
        session.checkpointed(info.step, version)
        metrics.CHECKPOINTS.inc()
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

    def on_stop(self, sessions: Iterable[Session]) -> int:
        """Graceful shutdown: every session with unsaved changes (a failure raises)."""
        if self.checkpoints is None:
            return 0
        n = 0
        for session in sessions:
            with session.lock:
                if session.dirty and not session.deleted:
                    self.write(session)
                    n += 1
        return n

    def _quietly(self, session: Session, kind: str) -> bool:
        try:
            self.write(session)
        except Exception:
            log.exception("%s checkpoint of session %s failed", kind, session.id)
            metrics.CHECKPOINT_FAILURES.inc()
            return False
        return True
