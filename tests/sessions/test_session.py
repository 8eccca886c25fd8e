"""A session keeps its own invariants: the one way to change it moves the version on
and wakes waiters (and a refused change does neither); the store hands out a session
only live and, given the one a request started on, only that one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import StepReport, TensorSpec
from adamserve.errors import NotFound
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.session import Session, SessionConfig
from adamserve.sessions.store import SessionStore

CONFIG = SessionConfig("adam", (TensorSpec("w", (3,)),))


def _store(tmp_path: Path | None = None) -> tuple[SessionStore, Session]:
    store = SessionStore(CpuBackend(), CheckpointStore(tmp_path) if tmp_path else None)
    session = store.create("s", CONFIG)
    session.lock.release()
    return store, session


def test_a_change_moves_the_version_on_and_wakes_waiters() -> None:
    store, session = _store()
    woke = threading.Event()

    def waiter() -> None:
        with session.changed:
            session.changed.wait_for(lambda: session.version > 0, timeout=10)
            woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    with store.locked("s") as s, s.changing():
        s.opt.param[...] = 1.0
    t.join(10)
    assert woke.is_set() and session.version == 1 and session.dirty


def test_a_refused_change_is_no_change() -> None:
    store, session = _store()
    with pytest.raises(ValueError), store.locked("s") as s, s.changing():
        raise ValueError("refused")
    assert session.version == 0 and not session.dirty


def test_a_step_counts_only_when_applied() -> None:
    store, session = _store()
    ran: list[int] = []
    store.after_step = lambda s, report: ran.append(report.step)
    with session.lock:
        session.record_step(StepReport(0, True, None), {"a": 1})
        assert session.version == 0 and not session.pushes.seen("a", 1) and ran == []
        session.record_step(StepReport(1, False, None), {"a": 1, "(anonymous 1)": 0})
    assert session.version == 1 and session.pushes.seen("a", 1) and ran == [1]


def test_the_store_hands_out_live_sessions_only(tmp_path: Path) -> None:
    store, session = _store(tmp_path)
    assert session.checkpointed_step == -1
    with store.locked("s", session):
        pass
    store.checkpoints.write(session)  # type: ignore[union-attr]
    new = store.checkpoints.load("s", store.backend)  # type: ignore[union-attr]
    assert new is not None
    store.replace(session, new)
    with session.lock:
        session.end(restored_to=0)
    with (pytest.raises(NotFound, match="was replaced during the request") as info,
          store.locked("s", session)):
        pass
    assert info.value.reason == "SESSION_NOT_FOUND" and info.value.metadata == {
        "session_id": "s"}
    with store.locked("s") as current:
        assert current is new and current.on_step is not None  # published with the trigger
        current.end()
    with pytest.raises(NotFound, match="'s' does not exist"), store.locked("s"):
        pass
