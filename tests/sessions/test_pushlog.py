"""The exactly-once record: duplicates, reordering, gaps, its bounds, its JSON form."""

from __future__ import annotations

import pytest

from adamserve.sessions.pushlog import MAX_WORKERS, WINDOW, PushLog


def test_gaps_never_block_a_worker_and_the_record_stays_small() -> None:
    log = PushLog()
    for seq in range(2, 5 * WINDOW):  # sequence 1 never arrives (say, a refused step)
        log.check("w", seq)
        assert not log.seen("w", seq)
        log.record("w", seq)
        assert log.seen("w", seq)
    state = log.to_json()["w"]
    assert len(state["above"]) <= WINDOW and state["high"] == 5 * WINDOW - 1
    assert log.seen("w", 1)  # fell out of the window: never applied late


def test_reordered_and_repeated_pushes_are_seen_once() -> None:
    log = PushLog()
    for seq in (3, 1, 2, 3, 1, 5):
        if not log.seen("a", seq):
            log.record("a", seq)
    assert [s for s in range(1, 7) if log.seen("a", s)] == [1, 2, 3, 5]
    again = PushLog.from_json(log.to_json())
    assert [s for s in range(1, 7) if again.seen("a", s)] == [1, 2, 3, 5]
    assert not again.seen("b", 1)


def test_far_ahead_sequences_are_refused_and_workers_are_bounded() -> None:
    log = PushLog()
    with pytest.raises(ValueError, match=f"more than {WINDOW} ahead"):
        log.check("w", WINDOW + 1)
    for i in range(MAX_WORKERS + 5):
        log.record(f"w{i}", 1)
    assert len(log.to_json()) == MAX_WORKERS
    assert not log.seen("w0", 1) and log.seen(f"w{MAX_WORKERS + 4}", 1)
