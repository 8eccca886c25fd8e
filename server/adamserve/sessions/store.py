"""The session registry: lookup (the one way to take a session: :meth:`SessionStore.locked`),
memory accounting (the server's caps and each tenant's), restore from checkpoints.

Sessions are kept under their qualified ids (:mod:`adamserve.sessions.names`): the
tenant is part of the key, so one tenant's lookups never reach another's sessions.
Memory a request holds while it runs (round buffers, uploads) is counted too, with
:meth:`SessionStore.reserved`, before it is allocated."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from adamserve.engine.backend import Backend
from adamserve.engine.optimizer import StepReport
from adamserve.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, shown
from adamserve.sessions import meta, names
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
    max_state_bytes: int | None = None  # all sessions together (of the server or a tenant)
    max_session_bytes: int | None = None  # any one session
    max_sessions: int | None = None  # sessions at once (of the server or a tenant)


class SessionStore:
    def __init__(self, backend: Backend, checkpoints: CheckpointStore | None,
                 limits: Limits = Limits(),
                 tenant_limits: Mapping[str, Limits] | None = None) -> None:
        self.backend = backend
        self.checkpoints = checkpoints
        self.limits = limits
        self.tenant_limits = dict(tenant_limits or {})  # tenant -> its quotas
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards the dict and the byte counts, never a step
        self._held: dict[str, int] = {}  # tenant -> bytes requests hold now (reserved)
        self._creating: set[str] = set()  # ids being allocated, counted in _held
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
        """Bytes of every session's state and of what requests hold now."""
        return sum(_held_by(s) for s in self._sessions.values()) + sum(self._held.values())

    def tenant_bytes(self, tenant: str) -> int:
        return sum(_held_by(s) for s in self._tenant_sessions(tenant)) + self._held.get(
            tenant, 0)

    def _tenant_sessions(self, tenant: str) -> list[Session]:
        return [s for s in self._sessions.values() if names.split(s.id)[0] == tenant]

    @contextmanager
    def reserved(self, session_id: str, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` a request is about to allocate for ``session_id`` (round
        buffers, an upload) against the caps while the block runs; ResourceExhausted,
        before anything is allocated, when they do not fit."""
        if nbytes <= 0:
            yield
            return
        tenant = names.split(session_id)[0]
        with self._lock:
            self._check_room(session_id, nbytes, nbytes, session_cap=False)
            self._held[tenant] = self._held.get(tenant, 0) + nbytes
        try:
            yield
        finally:
            with self._lock:
                self._unhold(tenant, nbytes)

    def create(self, session_id: str, config: SessionConfig) -> Session:
        """Allocate and publish a session (``session_id`` qualified); it is returned with
        its lock held. The caps are checked and the bytes counted under the store's lock;
        the allocation runs outside it, so one large create never stalls the others."""
        tenant, bare = names.split(session_id)
        try:
            names.check_tenant(tenant)
            check_session_id(bare)
            need = state_bytes(config)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self._lock:
            if session_id in self._sessions or session_id in self._creating:
                raise AlreadyExists(f"session {shown(bare)} already exists",
                                    metadata=meta(bare[:128]))
            self._check_room(session_id, need, need, new_session=True)
            self._creating.add(session_id)
            self._held[tenant] = self._held.get(tenant, 0) + need
        try:
            opt = build_optimizer(config, self.backend)
        except BaseException as exc:
            with self._lock:
                self._creating.discard(session_id)
                self._unhold(tenant, need)
            if isinstance(exc, ValueError):
                raise InvalidArgument(str(exc)) from None
            if isinstance(exc, MemoryError):
                raise ResourceExhausted(
                    f"session {bare!r}: the device could not allocate {need} bytes",
                    reason="DEVICE_OUT_OF_MEMORY", metadata=meta(bare)) from None
            raise
        session = Session(session_id, config, opt)
        session.lock.acquire()  # the caller initialises it before anyone else may use it
        with self._lock:
            self._creating.discard(session_id)
            self._unhold(tenant, need)
            self._publish(session)
        return session

    def _unhold(self, tenant: str, nbytes: int) -> None:
        """Stop counting ``nbytes`` of ``tenant``'s held memory (caller holds the lock)."""
        left = self._held[tenant] - nbytes
        if left:
            self._held[tenant] = left
        else:
            del self._held[tenant]

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

    def _check_room(self, session_id: str, session_bytes: int, extra_bytes: int, *,
                    new_session: bool = False, session_cap: bool = True) -> None:
        """The server's limits and the session's tenant's, for a session that would hold
        ``session_bytes`` once it took ``extra_bytes`` more (caller holds the lock)."""
        tenant = names.split(session_id)[0]
        scopes: list[tuple[str, Limits, Callable[[], Collection[Session]],
                           Callable[[], int]]] = [
            ("server", self.limits, self._sessions.values, self.total_bytes)]
        own = self.tenant_limits.get(tenant)
        if own is not None:
            scopes.append((f"tenant {tenant or '(default)'!r}", own,
                           lambda: self._tenant_sessions(tenant),
                           lambda: self.tenant_bytes(tenant)))
        bare = names.split(session_id)[1]
        for scope, limits, sessions, used_bytes in scopes:
            cap = limits.max_session_bytes
            if session_cap and cap is not None and session_bytes > cap:
                raise ResourceExhausted(
                    f"session {bare!r} would need {session_bytes} bytes of state; the "
                    f"per-session limit ({scope}) is {cap}", reason="QUOTA_EXCEEDED",
                    metadata=meta(bare, limit="max_session_bytes", bytes=session_bytes))
            cap = limits.max_sessions
            pending = sum(1 for c in self._creating if scope == "server"
                          or names.split(c)[0] == tenant)
            if new_session and cap is not None and len(sessions()) + pending >= cap:
                raise ResourceExhausted(
                    f"session {bare!r}: {scope} has {cap} sessions, the most allowed; "
                    "delete one first", reason="QUOTA_EXCEEDED",
                    metadata=meta(bare, limit="max_sessions", sessions=cap))
            cap = limits.max_state_bytes
            if cap is not None:
                used = used_bytes()
                if used + extra_bytes > cap:
                    raise ResourceExhausted(
                        f"session {bare!r} needs {extra_bytes} more bytes of state; "
                        f"{max(0, cap - used)} of {cap} are free ({scope})",
                        reason="QUOTA_EXCEEDED",
                        metadata=meta(bare, limit="max_state_bytes", bytes=extra_bytes))

    def all(self, tenant: str | None = None) -> list[Session]:
        """Every session (``tenant`` None), or one tenant's, ordered by qualified id."""
        chosen = self._sessions.values() if tenant is None else self._tenant_sessions(tenant)
        return sorted(chosen, key=lambda s: s.id)


def _held_by(session: Session) -> int:
    """A session's state and its rounds' buffers (allocated once rounds start)."""
    return session.state_bytes + session.rounds.buffer_bytes


def _gone(session_id: str) -> NotFound:
    # the id as its tenant sent it: the same answer as for an id no tenant has
    bare = names.split(session_id)[1]
    return NotFound(f"session {shown(bare)} does not exist", reason="SESSION_NOT_FOUND",
                    metadata=meta(bare[:128]))


def _replaced(session_id: str) -> NotFound:
    bare = names.split(session_id)[1]
    return NotFound(f"session {shown(bare)} was replaced during the request",
                    reason="SESSION_NOT_FOUND", metadata=meta(bare[:128]))
