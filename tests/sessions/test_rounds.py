"""Many workers on one session, at the service: synchronous rounds (the mean of K
pushes, straggler timeouts, K changed live), asynchronous staleness, and exactly-once
delivery of replayed pushes across a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from adamserve.service import OptimizerService, PushId, StepResult, TensorChunk
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import SessionStore
from tests.concurrency import in_threads

SHAPES = {"w": (4, 3), "b": (3,)}
BASE = SessionConfig("adam", tuple(TensorSpec(k, s) for k, s in SHAPES.items()),
                     groups=({"lr": 0.1},))


def _service(data: Path) -> OptimizerService:
    svc = OptimizerService(SessionStore(CpuBackend(), CheckpointStore(data)))
    svc.start()
    return svc


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _chunks(arrays: dict[str, np.ndarray]) -> list[TensorChunk]:
    return [TensorChunk(k, v.shape, "FP32", v.tobytes()) for k, v in arrays.items()]


def _stalling(resume: threading.Event) -> Iterator[TensorChunk]:
    """A push whose upload stalls after its first tensor until ``resume`` is set."""
    chunks = _chunks(_arrays(0))
    yield chunks[0]
    resume.wait(10)
    yield from chunks[1:]


def _config(**workers: Any) -> SessionConfig:
    return replace(BASE, workers=WorkersConfig(**workers))


def _params(svc: OptimizerService, sid: str = "s") -> np.ndarray:
    return np.array(svc.store.get(sid).opt.param, copy=True)


def test_a_sync_step_is_the_mean_of_k_pushes_and_every_worker_gets_its_parameters(
        tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=3))
    svc.create("ref", BASE)
    grads = [_arrays(i) for i in range(3)]
    results = in_threads(*(lambda i=i: svc.step("s", _chunks(grads[i]),
                                                 push_id=PushId(f"w{i}", 1), base_step=0)
                            for i in range(3)))
    assert all(isinstance(r, StepResult) for r in results), results
    assert {r.step for r in results} == {1} and {r.contributors for r in results} == {3}
    assert len({b"".join(bytes(c.data) for c in r.params) for r in results}) == 1
    # the server sums in float64, so the mean is the same bits whatever the arrival order
    mean = {k: ((grads[0][k].astype(np.float64) + grads[1][k] + grads[2][k]) / 3
                ).astype(np.float32) for k in SHAPES}
    svc.step("ref", _chunks(mean))
    np.testing.assert_array_equal(_params(svc), _params(svc, "ref"))


def test_pushes_return_at_once_and_pull_waits_for_the_step(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    first = svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 1))
    assert first.pending and first.step == 0
    assert first.round != 0  # the round the push joined, as the proto's RoundStatus says
    with pytest.raises(DeadlineExceeded, match="waiting for step 1"):
        svc.pull("s", min_step=1, timeout=0.05)
    waited = in_threads(lambda: svc.pull("s", min_step=1, timeout=10),
                         lambda: (time.sleep(0.1), svc.step(
                             "s", _chunks(_arrays(1)), return_datatype=None,
                             push_id=PushId("b", 1)))[1])
    assert isinstance(waited[0], list) and not waited[1].pending and waited[1].step == 1
    assert waited[1].round == first.round  # the same round, applied by the second push
    assert svc.describe("s").step == 1


def test_one_push_per_worker_per_step_and_resent_pushes_count_once(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 1))
    again = svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 1))
    assert again.pending and svc.store.get("s").round.arrived == 1  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition, match="worker 'a' already pushed for step 1"):
        svc.step("s", _chunks(_arrays(5)), return_datatype=None, push_id=PushId("a", 2))
    with pytest.raises(InvalidArgument, match=r"for 1 tensors, the first push of step 1 for "
                                              r"2: .* \(differing: b\)"):
        svc.step("s", _chunks(_arrays(1))[:1], return_datatype=None, push_id=PushId("b", 1))
    svc.step("s", _chunks(_arrays(1)), return_datatype=None, push_id=PushId("b", 1))
    assert svc.describe("s").step == 1
    late = svc.step("s", _chunks(_arrays(0)), push_id=PushId("a", 1), base_step=0)
    assert late.duplicate and late.step == 1  # applied already: acknowledged only
    with pytest.raises(FailedPrecondition, match=r"push for step 1 .* is too late"):
        svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("c", 1),
                 base_step=0)
    with pytest.raises(FailedPrecondition, match="has not reached that step"):
        svc.step("s", _chunks(_arrays(0)), return_datatype=None, base_step=7)


def test_a_straggler_timeout_fails_the_round_and_nothing_changes(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2, straggler_timeout=0.2))
    in_threads(*(lambda w=w: svc.step("s", _chunks(_arrays(0)), push_id=PushId(w, 1))
                  for w in "ab"))
    before = svc.store.get("s").fingerprint()
    t0 = time.monotonic()
    with pytest.raises(Aborted, match=r"step 2 .* 1 of 2 workers pushed within the straggler "
                                      r"timeout of 0.2 s \(missing: b\); nothing was applied"):
        svc.step("s", _chunks(_arrays(1)), push_id=PushId("a", 2), base_step=1)
    assert 0.15 < time.monotonic() - t0 < 5
    assert svc.store.get("s").fingerprint() == before
    # the same pushes again make the step
    results = in_threads(*(lambda w=w: svc.step("s", _chunks(_arrays(1)),
                                                 push_id=PushId(w, 2), base_step=1)
                            for w in "ab"))
    assert {r.step for r in results} == {2}, results


def test_policy_apply_takes_the_mean_of_what_arrived_and_names_the_missing(
        tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=3, straggler_timeout=0.2, straggler_policy="apply"))
    svc.create("ref", BASE)
    g = [_arrays(i) for i in range(3)]
    in_threads(*(lambda i=i: svc.step("s", _chunks(g[i]), push_id=PushId(f"w{i}", 1))
                  for i in range(3)))
    svc.step("ref", _chunks({k: ((g[0][k].astype(np.float64) + g[1][k] + g[2][k]) / 3
                                 ).astype(np.float32) for k in SHAPES}))
    results = in_threads(*(lambda i=i: svc.step("s", _chunks(g[i]), push_id=PushId(f"w{i}", 2),
                                                 base_step=1) for i in range(2)))
    assert {(r.step, r.contributors, r.missing) for r in results} == {(2, 2, ("w2",))}
    svc.step("ref", _chunks({k: ((g[0][k].astype(np.float64) + g[1][k]) / 2
                                 ).astype(np.float32) for k in SHAPES}))
    np.testing.assert_array_equal(_params(svc), _params(svc, "ref"))
    with pytest.raises(FailedPrecondition, match=r"step 2 \(that step was applied without it\)"):
        svc.step("s", _chunks(g[2]), push_id=PushId("w2", 2), base_step=1)


def test_changing_k_closes_a_round_that_is_full_already(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=3))
    for w in "ab":
        svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId(w, 1))
    info = svc.set_workers("s", 2)
    assert info.step == 1 and info.workers.count == 2
    svc.set_workers("s", 4)
    svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 2))
    assert svc.describe("s").step == 1
    with pytest.raises(InvalidArgument, match="workers: expected 1 to 512, got 0"):
        svc.set_workers("s", 0)


def test_async_pushes_are_bounded_by_staleness_and_may_scale_lr(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(mode="async", max_staleness=1, scale_lr_by_staleness=True))
    svc.create("ref", BASE)
    g = [_arrays(i) for i in range(3)]
    assert svc.step("s", _chunks(g[0]), base_step=0).staleness == 0
    assert svc.step("s", _chunks(g[1]), base_step=0).staleness == 1  # lr / 2
    before = svc.store.get("s").fingerprint()
    with pytest.raises(FailedPrecondition, match=r"computed from step 0 is 2 steps stale .* "
                                                 r"the bound is 1"):
        svc.step("s", _chunks(g[2]), base_step=0)
    assert svc.store.get("s").fingerprint() == before
    svc.step("ref", _chunks(g[0]))
    svc.set_hyperparameters("ref", 0, {"lr": 0.05})
    svc.step("ref", _chunks(g[1]))
    np.testing.assert_array_equal(_params(svc), _params(svc, "ref"))


def test_sync_rounds_replayed_and_reordered_apply_once_across_a_restart(
        tmp_path: Path) -> None:
    """Two workers, six rounds; every push is delivered 1-4 times, shuffled within its
    round and mixed with replays of earlier rounds, with a restart halfway: the state is
    bit for bit the mean of each round's two pushes, applied once."""
    rng = np.random.default_rng(3)
    svc = _service(tmp_path / "served")
    svc.create("s", _config(count=2))
    grads = {(w, k): _arrays(10 * k + ord(w)) for k in range(1, 7) for w in "ab"}
    for k in range(1, 7):
        if k == 4:
            svc.checkpoint("s")
            svc = _service(tmp_path / "served")
        mine = [(w, k) for w in "ab" for _ in range(1 + int(rng.integers(0, 4)))]
        old = [(w, j) for w in "ab" for j in range(1, k) if rng.random() < 0.5]
        deliveries = [*mine, *old]
        rng.shuffle(deliveries)
        for w, j in deliveries:
            r = svc.step("s", _chunks(grads[(w, j)]), return_datatype=None,
                         push_id=PushId(w, j))
            assert r.duplicate or j == k  # earlier rounds: applied already
        assert svc.describe("s").step == k
    reference = _service(tmp_path / "reference")
    reference.create("s", BASE)
    for k in range(1, 7):
        reference.step("s", _chunks({n: ((grads[("a", k)][n].astype(np.float64)
                                          + grads[("b", k)][n]) / 2).astype(np.float32)
                                     for n in SHAPES}))
    ours, ref = svc.store.get("s").opt, reference.store.get("s").opt
    np.testing.assert_array_equal(ours.param, ref.param)
    for slot in ref.slots:
        np.testing.assert_array_equal(ours.slots[slot], ref.slots[slot])


def test_a_shard_answers_a_push_with_its_sums_even_after_the_commit(tmp_path: Path) -> None:
    """Two workers on one shard: A's push waits for the round; B's push closes it and B
    commits before A's answer is built (the interleaving is forced here by building A's
    answer after the commit). A still gets the round's sums, and its own commit then gets
    the applied step's outcome, not an error."""
    svc = _service(tmp_path)
    svc.create("s", _config(count=2, exchange=True))
    session = svc.store.get("s")
    answers: list[Any] = []
    worker_a = threading.Thread(target=lambda: answers.append(svc.step(
        "s", _chunks(_arrays(0)), push_id=PushId("a", 1))))
    worker_a.start()
    while session.round is None:  # A's push has joined the round
        time.sleep(0.001)
    r = session.round
    staged = svc.step("s", _chunks(_arrays(1)), push_id=PushId("b", 1))
    assert staged.pending and staged.step == 0 and len(staged.grad_sumsq) == 2
    assert staged.round == r.id
    done = svc.commit("s", 1, staged.grad_sumsq, sum(staged.grad_sumsq), round_id=r.id)
    assert not done.pending and done.step == 1 and done.params
    late = svc._round_result(session, r, "FP32")  # A's answer, built after the commit
    worker_a.join(10)
    for answer in (late, answers[0]):
        assert answer.pending and answer.step == 0 and answer.grad_sumsq == staged.grad_sumsq
        again = svc.commit("s", 1, answer.grad_sumsq, sum(answer.grad_sumsq),
                           round_id=answer.round)
        assert (again.step, again.pending) == (1, False)
        assert [bytes(c.data) for c in again.params] == [bytes(c.data) for c in done.params]
    with pytest.raises(FailedPrecondition, match=r"commit of step 1 \(round 7\)"):
        svc.commit("s", 1, staged.grad_sumsq, 0.0, round_id=7)
    with pytest.raises(InvalidArgument, match=r"total_sumsq -1\.0"):
        svc.commit("s", 1, staged.grad_sumsq, -1.0)


def test_a_round_whose_kernel_fails_applies_nothing_and_the_next_one_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    session = svc.store.get("s")
    before = session.fingerprint()
    real = session.opt.backend.run
    calls = {"n": 0}

    def run_once_out_of_memory(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError
        real(*args)

    monkeypatch.setattr(session.opt.backend, "run", run_once_out_of_memory)
    svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 1))
    with pytest.raises(ResourceExhausted, match="ran out of memory applying step 1"):
        svc.step("s", _chunks(_arrays(1)), return_datatype=None, push_id=PushId("b", 1))
    assert session.fingerprint() == before and session.round is None
    with pytest.raises(Aborted, match="failed \\(MemoryError\\); nothing was applied"):
        svc.pull("s", min_step=1, timeout=1)
    for w in "ab":  # the same pushes again: the push log did not record them
        svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId(w, 1))
    assert svc.describe("s").step == 1


def test_a_skipped_round_is_reported_to_pulls_and_can_be_pushed_again(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    bad = _arrays(0)
    bad["w"][0, 0] = np.nan
    svc.step("s", _chunks(bad), return_datatype=None, push_id=PushId("a", 1))
    svc.step("s", _chunks(_arrays(1)), return_datatype=None, push_id=PushId("b", 1))
    with pytest.raises(Aborted, match="step 1 of session 's' was skipped: non-finite "
                                      "gradients in w"):
        svc.pull("s", min_step=1, timeout=1)
    svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 1))
    waiting = in_threads(lambda: svc.pull("s", min_step=1, timeout=10),
                          lambda: (time.sleep(0.05), svc.step(
                              "s", _chunks(_arrays(1)), return_datatype=None,
                              push_id=PushId("b", 1)))[1])
    assert isinstance(waiting[0], list) and svc.describe("s").step == 1


def test_what_cannot_change_while_a_round_is_open_or_staged(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 1))
    with pytest.raises(FailedPrecondition, match="round of pushes for step 1 open"):
        svc.add_tensors("s", [TensorSpec("extra", (2,))])
    svc.create("x", _config(count=1, exchange=True))
    exported = svc.export_state("x")
    svc.step("x", _chunks(_arrays(0)))  # staged: waits for its commit
    for change in (lambda: svc.import_state("x", exported),
                   lambda: svc.set_hyperparameters("x", 0, {"lr": 1.0}),
                   lambda: svc.set_schedule("x", {"kind": "constant"})):
        with pytest.raises(FailedPrecondition, match="staged and waits for its commit"):
            change()
    with pytest.raises(InvalidArgument, match="straggler_timeout cannot be combined"):
        svc.create("y", _config(count=2, exchange=True, straggler_timeout=1.0))


def test_a_stalled_upload_holds_up_no_other_worker(tmp_path: Path) -> None:
    """Worker a's upload stalls midway; worker b's push still joins the round, and the
    straggler timeout still fails it; a's push, once it resumes, starts the next try."""
    svc = _service(tmp_path)
    svc.create("s", _config(count=2, straggler_timeout=0.3))
    resume = threading.Event()
    slow = threading.Thread(target=lambda: svc.step("s", _stalling(resume), return_datatype=None,
                                                    push_id=PushId("a", 1)))
    slow.start()
    t0 = time.monotonic()
    with pytest.raises(Aborted, match="1 of 2 workers pushed"):
        svc.step("s", _chunks(_arrays(1)), push_id=PushId("b", 1))
    assert time.monotonic() - t0 < 3
    resume.set()
    slow.join(10)
    assert svc.store.get("s").round is not None  # a's push opened the next try
    done = svc.step("s", _chunks(_arrays(1)), push_id=PushId("b", 1))
    assert done.step == 1 and done.contributors == 2


def test_rounds_of_frozen_tensors_and_waits_that_end(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    only_w = _chunks(_arrays(0))[:1]  # b is frozen on every worker
    svc.step("s", only_w, return_datatype=None, push_id=PushId("a", 1))
    done = svc.step("s", only_w, push_id=PushId("b", 1))
    assert done.step == 1
    assert list(svc.store.get("s").opt.seg_step) == [1, 0]
    with pytest.raises(DeadlineExceeded, match=r"waiting for step 2 .* 1 of 2 pushes"):
        svc.step("s", only_w, push_id=PushId("a", 2), base_step=1, wait=0.1)
    assert svc.waits.waiting == 0
    svc.checkpoint("s")
    waiter = in_threads(lambda: svc.step("s", only_w, push_id=PushId("a", 2), base_step=1),
                         lambda: (time.sleep(0.1), svc.restore_checkpoint("s", 1))[1])
    assert isinstance(waiter[0], Aborted) and "restored to its checkpoint of step 1" in str(
        waiter[0])


def test_a_shard_changes_its_worker_count_only_between_steps(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("x", _config(count=2, exchange=True))
    out = in_threads(lambda: svc.step("x", _chunks(_arrays(0)), push_id=PushId("a", 1),
                                       wait=1.0),
                      lambda: (time.sleep(0.1), svc.set_workers("x", 1))[1])
    assert isinstance(out[0], DeadlineExceeded)  # its round never closed
    assert isinstance(out[1], FailedPrecondition) and "between steps" in str(out[1])
    assert svc.describe("x").workers.count == 2


def test_a_round_nobody_waits_on_still_times_out(tmp_path: Path) -> None:
    """Workers that push and pull later: the server ends the round at its deadline."""
    svc = _service(tmp_path)
    svc.create("s", _config(count=2, straggler_timeout=0.1))
    svc.step("s", _chunks(_arrays(0)), return_datatype=None, push_id=PushId("a", 1))
    assert svc.expire_rounds() == 0  # not yet
    time.sleep(0.15)
    assert svc.expire_rounds() == 1
    assert svc.store.get("s").round is None
    with pytest.raises(Aborted, match="1 of 2 workers pushed"):
        svc.pull("s", min_step=1, timeout=1)


def test_tensors_added_while_a_push_arrives_refuse_it_and_imports_end_the_round(
        tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    resume = threading.Event()
    out = in_threads(lambda: svc.step("s", _stalling(resume), return_datatype=None,
                                      push_id=PushId("a", 1)),
                     lambda: (svc.add_tensors("s", [TensorSpec("extra", (2,))]),
                              resume.set())[0])
    assert isinstance(out[0], FailedPrecondition) and "changed while this push arrived" in str(
        out[0])
    assert svc.store.get("s").round is None  # the refused push opened nothing
    # a round open when a state_dict is imported fails: its pushes were for the old state
    svc.step("s", [*_chunks(_arrays(0)), TensorChunk("extra", (2,), "FP32", bytes(8))],
             return_datatype=None, push_id=PushId("a", 1))
    svc.import_state("s", svc.export_state("s"))
    with pytest.raises(Aborted, match="a state_dict was imported"):
        svc.pull("s", min_step=1, timeout=1)


def test_a_worker_collecting_late_gets_its_rounds_parameters(tmp_path: Path) -> None:
    """A worker that collects its answer after another one has already changed the
    parameters (SetParameters after its step) still gets the parameters of the step."""
    svc = _service(tmp_path)
    svc.create("s", _config(count=2))
    late = threading.Event()
    wait = svc.waits.wait

    def slow_for_b(*args: Any, **kwargs: Any) -> None:
        wait(*args, **kwargs)
        if threading.current_thread().name == "b":
            late.wait(10)

    svc.waits.wait = slow_for_b  # type: ignore[method-assign]
    answers: dict[str, StepResult] = {}

    def push(worker: str, seed: int) -> None:
        answers[worker] = svc.step("s", _chunks(_arrays(seed)), push_id=PushId(worker, 1),
                                   base_step=0)

    a = threading.Thread(target=push, args=("a", 1), name="a")
    b = threading.Thread(target=push, args=("b", 2), name="b")
    a.start()
    b.start()
    a.join(10)
    stepped = _params(svc)
    svc.set_parameters("s", _chunks({k: np.full(v, 9.0, np.float32) for k, v in SHAPES.items()}))
    late.set()
    b.join(10)
    got = {b"".join(bytes(c.data) for c in answers[w].params) for w in ("a", "b")}
    assert got == {stepped.tobytes()}
    assert np.all(_params(svc) == 9.0)
    r = svc.store.get("s").rounds.ended
    assert r is not None and not r.owed and not r.kept  # nothing kept once collected
