"""The round coordinator's state machine: every legal transition, every illegal one
refused, and the paths a real session's rounds take (one server, a shard, a shard
running LAMB, a skipped step, a straggler timeout)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.sessions.coordinator import (
    NEXT,
    IllegalTransition,
    Round,
    RoundState,
)
from adamserve.sessions.pushlog import PushId
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import Session, SessionConfig
from adamserve.sessions.store import SessionStore

S = RoundState
FINAL = {S.APPLIED, S.SKIPPED, S.FAILED}
LEGAL = {
    (S.OPEN, S.STAGED), (S.OPEN, S.APPLIED), (S.OPEN, S.SKIPPED), (S.OPEN, S.FAILED),
    (S.STAGED, S.LAMB), (S.STAGED, S.APPLIED), (S.STAGED, S.SKIPPED), (S.STAGED, S.FAILED),
    (S.LAMB, S.APPLIED), (S.LAMB, S.FAILED),
}
SHAPES = {"w": (4, 3), "b": (3,)}


def _round(state: RoundState) -> Round:
    return Round(step=1, id=7, active=np.ones(2, dtype=bool), state=state)


@pytest.mark.parametrize(("start", "to"), list(itertools.product(S, S)),
                         ids=lambda s: s.name)
def test_every_transition_is_legal_exactly_when_the_table_has_it(start: RoundState,
                                                                 to: RoundState) -> None:
    r = _round(start)
    if (start, to) in LEGAL:
        r.move(to)
        assert r.state is to
    else:
        with pytest.raises(IllegalTransition, match=f"{start.name} -> {to.name}"):
            r.move(to)
        assert r.state is start  # a refused move changes nothing


def test_the_table_is_the_documented_machine() -> None:
    assert {(a, b) for a, nexts in NEXT.items() for b in nexts} == LEGAL
    assert all(not NEXT[s] for s in FINAL)  # final states are final
    assert {s for s in S if _round(s).staged} == {S.STAGED, S.LAMB}


def test_only_an_open_round_with_pushes_has_a_deadline() -> None:
    w = WorkersConfig(count=2, straggler_timeout=5.0)
    r = _round(S.OPEN)
    assert r.deadline(w) is None  # no push yet
    r.pushes["a"] = 1
    assert r.deadline(w) == pytest.approx(r.started + 5.0)
    assert r.deadline(WorkersConfig(count=2)) is None
    r.move(S.STAGED)
    assert r.deadline(w) is None


# -- the coordinator of a real session ------------------------------------------------


Make = Callable[..., Session]


@pytest.fixture
def make() -> Make:
    """Sessions of one store, built as the service builds them, unlocked."""
    store = SessionStore(CpuBackend(), None)

    def build(algorithm: str = "adam", **workers: Any) -> Session:
        config = SessionConfig(algorithm, tuple(TensorSpec(k, s) for k, s in SHAPES.items()),
                               workers=WorkersConfig(**workers))
        session = store.create(f"s{len(store.all())}", config)  # returned locked
        session.lock.release()
        return session

    return build


def _grad(seed: int, bad: bool = False) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal(15).astype(np.float32)
    if bad:
        g[0] = np.nan
    return g


ALL = np.ones(2, dtype=bool)


def _sums(session: Session, r: Round) -> tuple[np.ndarray, float]:
    assert r.grad_sumsq is not None
    return r.grad_sumsq, float(r.grad_sumsq.sum())


def test_one_server_applies_a_full_round_at_once(make: Make) -> None:
    session = make(count=2)
    rounds = session.rounds
    with session.lock:
        version = session.version
        r = rounds.arrive(_grad(0), ALL, PushId("a", 1))
        assert r.state is S.OPEN and rounds.current is r and session.round is r
        assert rounds.arrive(_grad(0), ALL, PushId("a", 1)) is r  # the same push again
        assert r.arrived == 1
        rounds.arrive(_grad(1), ALL, PushId("b", 1))
    assert r.state is S.APPLIED and rounds.current is None
    assert rounds.last is r.outcome and r.outcome is not None and r.outcome.contributors == 2
    assert session.version == version + 1 and session.opt.step_count == 1
    assert session.pushes.seen("a", 1) and session.pushes.seen("b", 1)
    assert rounds.members == {"a", "b"}
    with pytest.raises(IllegalTransition):  # it is over
        rounds.fail(r, "too late")


def test_a_shard_stages_then_commits(make: Make) -> None:
    session = make(count=1, exchange=True)
    rounds = session.rounds
    with session.lock:
        r = rounds.arrive(_grad(0), ALL, PushId("a", 1))
        assert r.state is S.STAGED and r.staged and r.grad_sumsq is not None
        assert session.opt.step_count == 0 and rounds.for_commit(1, r.id) is r
        with pytest.raises(IllegalTransition, match="second commit in state STAGED"):
            rounds.commit_lamb(r, *_sums(session, r))
        rounds.commit(r, *_sums(session, r))
        assert r.state is S.APPLIED and session.opt.step_count == 1
        with pytest.raises(IllegalTransition, match="first commit in state APPLIED"):
            rounds.commit(r, *_sums(session, r))
        assert rounds.for_commit(1, r.id) is r.outcome  # a repeated commit: the outcome


def test_a_shard_running_lamb_commits_twice(make: Make) -> None:
    session = make("lamb", count=1, exchange=True)
    rounds = session.rounds
    with session.lock:
        r = rounds.arrive(_grad(0), ALL, None)
        rounds.commit(r, *_sums(session, r))
        assert r.state is S.LAMB and r.lamb is not None and r.staged
        assert session.opt.step_count == 0  # nothing applied between the commits
        rounds.commit_lamb(r, r.lamb.param_sumsq, r.lamb.update_sumsq)
    assert r.state is S.APPLIED and session.opt.step_count == 1 and r.lamb is None


def test_non_finite_gradients_skip_the_step(make: Make) -> None:
    session = make(count=1, exchange=True)
    rounds = session.rounds
    with session.lock:
        version = session.version
        r = rounds.arrive(_grad(0, bad=True), ALL, PushId("a", 1))
        rounds.commit(r, *_sums(session, r))
    assert r.state is S.SKIPPED and session.version == version
    assert not session.pushes.seen("a", 1)  # the worker may push for the step again
    assert "was skipped: non-finite gradients in w" in rounds.failed(1)


def test_a_straggler_timeout_fails_the_round(make: Make) -> None:
    session = make(count=2, straggler_timeout=0.05)
    rounds = session.rounds
    with session.lock:
        r = rounds.arrive(_grad(0), ALL, PushId("a", 1))
        assert not rounds.expire()  # not yet
    time.sleep(0.06)
    with session.lock:
        assert rounds.expire()
    assert r.state is S.FAILED and rounds.current is None
    assert "1 of 2 workers pushed within the straggler timeout" in rounds.failed(1)


def test_fewer_workers_close_a_full_round(make: Make) -> None:
    session = make(count=3)
    with session.lock:
        r = session.rounds.arrive(_grad(0), ALL, PushId("a", 1))
        session.rounds.arrive(_grad(1), ALL, PushId("b", 1))
        session.config = replace(session.config, workers=WorkersConfig(count=2))
        session.rounds.workers_changed()
    assert r.state is S.APPLIED and r.outcome is not None and r.outcome.contributors == 2
