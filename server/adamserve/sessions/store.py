"""The session registry: lookup (the one way to take a session: :meth:`SessionStore.locked`),
memory accounting, restore from checkpoints."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from adamserve.engine.backend import Backend
from adamserve.engine.optimizer import StepReport
from adamserve.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from adamserve.sessions import meta
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.session import (
    Session,
    SessionConfig,
    build_optimizer,
    check_session_id,
    state_bytes,
)

log = logging.getLogger("adamserve.sessions")


@dataclass(frozen=True)
class Limits:
    max_state_bytes: int | None = None  # all sessions together
    max_session_bytes: int | None = None  # any one session


class SessionStore:
    def __init__(self, backend: Backend, checkpoints: CheckpointStore | None,
                 limits: Limits = Limits()) -> None:
        self.backend = backend
        self.checkpoints = checkpoints
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards the dict and the byte count, never a step
        # runs after every step applied to any session (the service's checkpoint policy)
        self.after_step: Callable[[Session, StepReport], None] | None = None

    def _publish(self, session: Session) -> None:
        """Make ``session`` the one under its id (the caller holds ``_lock`` or is alone)."""
        session.on_step = self._stepped
        self._sessions[session.id] = session

    def _stepped(self, session: Session, report: StepReport) -> None:
        if self.after_step is not None:
            self.after_step(session, report)

    def restore_all(self) -> list[str]:
        """Load every session's newest complete checkpoint; sweep temp leftovers first."""
        if self.checkpoints is None:
            return []
        swept = self.checkpoints.sweep()
        if swept:
            log.info("swept %d leftover temporary checkpoint files", swept)
        restored = []
        for sid in self.checkpoints.session_ids():
            session = self.checkpoints.load(sid, self.backend)
            if session is None:
                log.warning("session %s has no complete checkpoint; not restored", sid)
                continue
            self._publish(session)
            restored.append(sid)
            log.info("restored session %s at step %d", sid, session.opt.step_count)
        return restored

    def total_bytes(self) -> int:
        return sum(s.state_bytes for s in self._sessions.values())

    def create(self, session_id: str, config: SessionConfig) -> Session:
        """Allocate and publish a session; it is returned with its lock held."""
        try:
            check_session_id(session_id)
            need = state_bytes(config)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self._lock:
            if session_id in self._sessions:
                raise AlreadyExists(f"session {session_id!r} already exists",
                                    metadata=meta(session_id))
            self._check_room(session_id, need, need)
            try:
                opt = build_optimizer(config, self.backend)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            except MemoryError:
                raise ResourceExhausted(
                    f"session {session_id!r}: the device could not allocate {need} bytes",
                    reason="DEVICE_OUT_OF_MEMORY", metadata=meta(session_id)) from None
            session = Session(session_id, config, opt)
            session.lock.acquire()  # the caller initialises it before anyone else may use it
            self._publish(session)
            return session

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise _gone(session_id) from None

    @contextmanager
    def locked(self, session_id: str, claimed: Session | None = None) -> Iterator[Session]:
        """The session with its lock held. NotFound if it is gone (deleted while we
        waited for the lock) or, given the ``claimed`` session a request started on,
        if another one stands under its id now (replaced during the request)."""
        session = self.get(session_id)
        with session.lock:
            if session.deleted:
                raise _gone(session_id)
            if claimed is not None and session is not claimed:
                raise _replaced(session_id)
            yield session

    def remove(self, session: Session) -> None:
        """Unpublish ``session`` (not another one created since under the same id)."""
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    def replace(self, old: Session, new: Session) -> None:
        """Publish ``new`` in place of ``old`` (a checkpoint restored over a live session)."""
        with self._lock:
            if self._sessions.get(old.id) is not old:
                raise _replaced(old.id)
            self._publish(new)

    def check_room(self, extra_bytes: int, session: Session) -> None:
        """Refuse growing ``session`` by ``extra_bytes`` past the limits."""
        with self._lock:
            self._check_room(session.id, session.state_bytes + extra_bytes, extra_bytes)

    def _check_room(self, session_id: str, session_bytes: int, extra_bytes: int) -> None:
        """The limits, for a session that would hold ``session_bytes`` once it took
        ``extra_bytes`` more (caller holds the store's lock)."""
        cap = self.limits.max_session_bytes
        if cap is not None and session_bytes > cap:
            raise ResourceExhausted(
                f"session {session_id!r} would need {session_bytes} bytes of state; the "
                f"per-session limit is {cap}", reason="QUOTA_EXCEEDED",
                metadata=meta(session_id, limit="max_session_bytes", bytes=session_bytes))
        cap = self.limits.max_state_bytes
        used = self.total_bytes()
        if cap is not None and used + extra_bytes > cap:
            raise ResourceExhausted(
                f"session {session_id!r} needs {extra_bytes} more bytes of state; "
                f"{max(0, cap - used)} of {cap} are free", reason="QUOTA_EXCEEDED",
                metadata=meta(session_id, limit="max_state_bytes", bytes=extra_bytes))

    def all(self) -> list[Session]:
        return sorted(self._sessions.values(), key=lambda s: s.id)


def _gone(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} does not exist", reason="SESSION_NOT_FOUND",
                    metadata=meta(session_id))


def _replaced(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} was replaced during the request",
                    reason="SESSION_NOT_FOUND", metadata=meta(session_id))
