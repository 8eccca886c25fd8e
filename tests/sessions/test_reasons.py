"""Every main refusal of the service carries its stable reason (errors.REASONS) and
metadata naming the session, whatever its message says."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adamserve.engine.optimizer import TensorSpec
from adamserve.errors import (
    REASONS,
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from adamserve.service import PushId, TensorChunk
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import TENSOR_OVERHEAD, SessionConfig
from adamserve.sessions.store import Limits
from tests.concurrency import in_threads
from tests.sessions.support import SHAPES
from tests.sessions.support import gradients as _grads
from tests.sessions.support import service as _service

BASE = SessionConfig("adam", tuple(TensorSpec(k, s) for k, s in SHAPES.items()))
NUMEL = sum(int(np.prod(s)) for s in SHAPES.values())


def _workers(**kw: Any) -> SessionConfig:
    return replace(BASE, workers=WorkersConfig(**kw))


def _refusal(call: Callable[[], object], kind: type[ServiceError], reason: str,
             **metadata: str) -> ServiceError:
    with pytest.raises(kind) as info:
        call()
    err = info.value
    assert reason in REASONS and err.reason == reason, (err.reason, str(err))
    assert metadata.items() <= err.metadata.items(), err.metadata
    return err


def test_a_push_too_late_for_its_step_is_stale(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _workers(count=2))
    in_threads(*(lambda w=w: svc.step("s", _grads(), push_id=PushId(w, 1), base_step=0)
                 for w in "ab"))
    err = _refusal(lambda: svc.step("s", _grads(), push_id=PushId("c", 1), base_step=0),
                   FailedPrecondition, "STALE_PUSH", session_id="s", step="1", base_step="0")
    assert "is too late" in str(err)


def test_an_async_push_past_the_staleness_bound_is_stale(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _workers(mode="async", max_staleness=0))
    svc.step("s", _grads(), base_step=0)
    _refusal(lambda: svc.step("s", _grads(), base_step=0), FailedPrecondition, "STALE_PUSH",
             session_id="s")


def test_a_push_from_a_step_not_reached_is_ahead(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", BASE)
    _refusal(lambda: svc.step("s", _grads(), base_step=3), FailedPrecondition, "PUSH_AHEAD",
             session_id="s", step="0", base_step="3")


def test_a_worker_pushing_twice_for_a_step(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _workers(count=2))
    svc.step("s", _grads(), return_datatype=None, push_id=PushId("a", 1))
    _refusal(lambda: svc.step("s", _grads(1), return_datatype=None, push_id=PushId("a", 2)),
             FailedPrecondition, "DUPLICATE_WORKER_PUSH", session_id="s", worker="a")
    _refusal(lambda: svc.add_tensors("s", [TensorSpec("x", (2,))]), FailedPrecondition,
             "ROUND_OPEN", session_id="s", step="1")


def test_a_round_aborted_by_the_straggler_timeout(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _workers(count=2, straggler_timeout=0.1))
    err = _refusal(lambda: svc.step("s", _grads(), push_id=PushId("a", 1)), Aborted,
                   "ROUND_ABORTED", session_id="s", step="1")
    assert "straggler timeout" in str(err)
    _refusal(lambda: svc.pull("s", min_step=1, timeout=1), Aborted, "ROUND_ABORTED",
             session_id="s", step="1")


def test_a_wait_that_runs_out(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", BASE)
    _refusal(lambda: svc.pull("s", min_step=1, timeout=0.01), DeadlineExceeded, "WAIT_TIMEOUT",
             session_id="s")


def test_checkpoints_disabled_and_not_found(tmp_path: Path) -> None:
    off = _service(None)
    off.create("s", BASE)
    for call in (lambda: off.checkpoint("s"), lambda: off.restore_checkpoint("s", 0)):
        _refusal(call, FailedPrecondition, "CHECKPOINTS_DISABLED")
    on = _service(tmp_path)
    on.create("s", BASE)
    _refusal(lambda: on.restore_checkpoint("s", 5), NotFound, "CHECKPOINT_NOT_FOUND",
             session_id="s", step="5")
    _refusal(lambda: on.describe("nope"), NotFound, "SESSION_NOT_FOUND", session_id="nope")


def test_the_memory_cap(tmp_path: Path) -> None:
    # param, grad, m, v and each tensor's own bytes
    svc = _service(tmp_path, Limits(max_state_bytes=4 * 4 * NUMEL + len(SHAPES) * TENSOR_OVERHEAD))
    svc.create("s", BASE)
    _refusal(lambda: svc.create("t", BASE), ResourceExhausted, "QUOTA_EXCEEDED",
             session_id="t", limit="max_state_bytes")
    _refusal(lambda: svc.set_hyperparameters("s", 0, {"amsgrad": True}), ResourceExhausted,
             "QUOTA_EXCEEDED", session_id="s")
    one = _service(None, Limits(max_session_bytes=8))
    _refusal(lambda: one.create("s", BASE), ResourceExhausted, "QUOTA_EXCEEDED",
             limit="max_session_bytes")


def test_the_device_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = _service(tmp_path)
    svc.create("s", _workers(count=1, exchange=True))
    backend = svc.store.get("s").opt.backend

    def no_memory(*args: object) -> None:
        raise MemoryError

    monkeypatch.setattr(backend, "run", no_memory)
    staged = svc.step("s", _grads())
    _refusal(lambda: svc.commit("s", 1, staged.grad_sumsq, sum(staged.grad_sumsq)),
             ResourceExhausted, "DEVICE_OUT_OF_MEMORY", session_id="s", step="1")


def test_changes_while_a_step_is_staged(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("x", _workers(count=1, exchange=True))
    svc.step("x", _grads())
    _refusal(lambda: svc.set_schedule("x", {"kind": "constant"}), FailedPrecondition,
             "STEP_STAGED", session_id="x", step="1")
    _refusal(lambda: svc.step("x", _grads()), FailedPrecondition, "STEP_STAGED", step="1")


def _stalling(resume: threading.Event) -> Iterator[TensorChunk]:
    chunks = _grads()
    yield chunks[0]
    resume.wait(10)
    yield from chunks[1:]


def test_requests_overtaken_while_they_arrived(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", _workers(count=2))  # each push decoded on its own: add_tensors can run
    resume = threading.Event()
    out = in_threads(lambda: svc.step("s", _stalling(resume), push_id=PushId("a", 1)),
                     lambda: (time.sleep(0.1), svc.add_tensors("s", [TensorSpec("x", (2,))]),
                              resume.set()))
    assert isinstance(out[0], FailedPrecondition) and out[0].reason == "LAYOUT_CHANGED"
    svc.checkpoint("s")
    resume.clear()
    out = in_threads(lambda: svc.set_parameters("s", _stalling(resume)),
                     lambda: (time.sleep(0.1), svc.restore_checkpoint("s", 0), resume.set()))
    assert isinstance(out[0], NotFound) and out[0].reason == "SESSION_NOT_FOUND"
    assert "was replaced during the request" in str(out[0])


def test_commits_that_do_not_fit_the_staged_step(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("x", _workers(count=1, exchange=True))
    err = _refusal(lambda: svc.commit("x", 1, [0.0, 0.0], 0.0), FailedPrecondition,
                   "NO_STAGED_STEP", session_id="x", step="0")
    assert "has no step waiting for a commit" in str(err)
    staged = svc.step("x", _grads())
    _refusal(lambda: svc.commit("x", 2, staged.grad_sumsq, 1.0), FailedPrecondition,
             "NO_STAGED_STEP", session_id="x")
    svc.create("lamb", replace(_workers(count=1, exchange=True), algorithm="lamb"))
    staged = svc.step("lamb", _grads())
    _refusal(lambda: svc.commit("lamb", 1, staged.grad_sumsq, sum(staged.grad_sumsq),
                                param_sumsq=[1.0, 1.0], update_sumsq=[1.0, 1.0]),
             FailedPrecondition, "COMMIT_OUT_OF_ORDER", session_id="lamb", step="1")


def test_steps_that_cannot_be_applied_as_they_arrive(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("lamb", replace(BASE, algorithm="lamb", skip_nonfinite=False))
    svc.create("workers", replace(_workers(count=2), skip_nonfinite=False))
    for sid in ("lamb", "workers"):
        _refusal(lambda sid=sid: list(svc.step_stream(sid, _grads())), FailedPrecondition,
                 "NOT_STREAMABLE", session_id=sid)
