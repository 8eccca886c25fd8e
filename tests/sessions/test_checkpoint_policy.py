"""Every checkpoint trigger, in the one policy that owns them: every N steps, every S
seconds (only sessions with unsaved changes), on stop, on request."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.errors import FailedPrecondition
from adamserve.service import OptimizerService, TensorChunk
from adamserve.sessions.checkpoint_policy import CheckpointPolicy
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import SessionStore

CONFIG = SessionConfig("adam", (TensorSpec("w", (3,)),))
GRAD = [TensorChunk("w", (3,), "FP32", np.ones(3, np.float32).tobytes())]


def _service(data: Path | None, **every: float) -> OptimizerService:
    svc = OptimizerService(SessionStore(CpuBackend(), CheckpointStore(data) if data else None),
                           checkpoint_every_steps=int(every.get("steps", 0)),
                           checkpoint_every_seconds=every.get("seconds", 0.0))
    svc.start()
    svc.create("s", CONFIG)
    return svc


def test_every_n_steps_checkpoints_at_the_multiples_of_n(tmp_path: Path) -> None:
    svc = _service(tmp_path, steps=2)
    for _ in range(5):
        svc.step("s", GRAD)
    assert svc.list_checkpoints("s") == [2, 4]
    assert svc.describe("s").checkpointed_step == 4


def test_every_s_seconds_checkpoints_what_changed_since(tmp_path: Path) -> None:
    svc = _service(tmp_path, seconds=0.05)
    assert svc.policy.period == pytest.approx(0.0125)
    svc.step("s", GRAD)
    assert svc.checkpoint_due() == 0  # its last checkpoint (none: creation) is too recent
    time.sleep(0.06)
    assert svc.checkpoint_due() == 1 and svc.list_checkpoints("s") == [1]
    time.sleep(0.06)
    assert svc.checkpoint_due() == 0  # nothing changed since


def test_on_stop_checkpoints_every_session_with_unsaved_changes(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    assert svc.checkpoint_all().saved == ("s",)  # created, never saved
    assert svc.checkpoint_all().saved == ()
    svc.step("s", GRAD)
    done = svc.checkpoint_all()
    assert done.saved == ("s",) and not done.failed and svc.list_checkpoints("s") == [0, 1]


def test_without_a_data_directory_only_a_request_is_refused(tmp_path: Path) -> None:
    svc = _service(None, steps=1, seconds=0.01)
    policy = svc.policy
    assert policy.period is None
    svc.step("s", GRAD)  # the every-N trigger stays quiet
    assert svc.checkpoint_due() == 0 and svc.checkpoint_all().saved == ()
    with pytest.raises(FailedPrecondition, match="checkpoints are disabled") as info:
        svc.checkpoint("s")
    assert info.value.reason == "CHECKPOINTS_DISABLED"
    assert CheckpointPolicy(CheckpointStore(tmp_path)).period is None  # no interval
