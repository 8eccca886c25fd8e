"""Requests that wait for a step: a pull with ``min_step``, a push waiting for its round.

A wait holds a transport thread, so waits are bounded twice: each by ``MAX_WAIT``
seconds (the client asks again if it must) and all of them together by
``MAX_WAITERS``. While it waits, the straggler timeout of the session's round is
enforced here too, so a round with waiters ends on time even between the server's
timer ticks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from adamserve.errors import Aborted, DeadlineExceeded, NotFound, ResourceExhausted
from adamserve.sessions import meta
from adamserve.sessions.session import Session

# The longest one request waits for a step (a pull, or a step waiting for its round; the
# client asks again if it must): a server thread is not held forever by a client that
# waits for a step that never comes, or that went away.
MAX_WAIT = 600.0
# Requests waiting at once, over all sessions: each holds a transport thread (there are
# 1024); past this, waits are refused so that the pushes that end them still get one.
MAX_WAITERS = 768


def bounded(timeout: float | None) -> float:
    """A wait's limit: at most ``MAX_WAIT`` seconds."""
    return MAX_WAIT if timeout is None else min(timeout, MAX_WAIT)


class Waits:
    def __init__(self) -> None:
        self.waiting = 0  # requests in wait() now
        self._lock = threading.Lock()

    def wait(self, session: Session, done: Callable[[], bool], timeout: float | None,
             what: str) -> None:
        """Block until ``done()`` (checked under the session's lock), enforcing straggler
        timeouts; DeadlineExceeded after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        with session.changed:
            if done():  # no need to wait: counts against no cap
                return
        with self._lock:
            if self.waiting >= MAX_WAITERS:
                raise ResourceExhausted(
                    f"{self.waiting} requests are waiting for steps already; try again when "
                    "some have ended", reason="QUOTA_EXCEEDED",
                    metadata=meta(session.id, limit="max_waiters"))
            self.waiting += 1
        try:
            self._until(session, done, end, timeout, what)
        finally:
            with self._lock:
                self.waiting -= 1

    @staticmethod
    def _until(session: Session, done: Callable[[], bool], end: float | None,
               timeout: float | None, what: str) -> None:
        while True:
            with session.changed:
                while not done():
                    if session.deleted:
                        raise _gone(session)
                    dl = session.rounds.deadline()
                    now = time.monotonic()
                    if dl is not None and now >= dl:
                        break
                    if end is not None and now >= end:
                        raise DeadlineExceeded(
                            f"timed out after {timeout:g} s waiting for {what}",
                            reason="WAIT_TIMEOUT", metadata=meta(session.id))
                    limit = min(x for x in (dl, end, now + 60.0) if x is not None)
                    session.changed.wait(limit - now)
                else:
                    return
            with session.lock:  # the round has run out of time
                session.rounds.expire()


def _gone(session: Session) -> Aborted | NotFound:
    """What a waiter on a retired session gets."""
    if session.restored_to is not None:
        return Aborted(f"session {session.id!r} was restored to its checkpoint of step "
                       f"{session.restored_to}: pull the parameters and push again",
                       reason="ROUND_ABORTED",
                       metadata=meta(session.id, restored_to=session.restored_to))
    return NotFound(f"session {session.id!r} was deleted", reason="SESSION_NOT_FOUND",
                    metadata=meta(session.id))
