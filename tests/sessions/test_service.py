"""The service's own rules: refused requests change nothing, deletes win races,
checkpoints keep every change and survive damage."""

from __future__ import annotations

import errno
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.errors import InvalidArgument, NotFound, ResourceExhausted
from adamserve.service import OptimizerService, TensorChunk
from adamserve.sessions.checkpoints import CheckpointInfo, CheckpointStore
from adamserve.sessions.session import TENSOR_OVERHEAD, Session, SessionConfig
from adamserve.sessions.store import Limits, SessionStore
from tests.sessions.support import SHAPES
from tests.sessions.support import gradients as _grads
from tests.sessions.support import service as _service

CONFIG = SessionConfig("adam", tuple(TensorSpec(k, s) for k, s in SHAPES.items()))


def test_refused_imports_change_nothing(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    svc.step("s", _grads())
    good = svc.export_state("s")
    before = svc.store.get("s").fingerprint()
    huge_step = {"state": {i: {**e, "step": 1e300} for i, e in good["state"].items()},
                 "param_groups": [{**good["param_groups"][0], "lr": 0.5}]}
    dup_names = {"state": good["state"],
                 "param_groups": [{**good["param_groups"][0], "param_names": ["w", "w"]}]}
    dup_index = {"state": good["state"],
                 "param_groups": [{**good["param_groups"][0], "params": [0, 0],
                                   "param_names": None}]}
    short_names = {"state": good["state"],
                   "param_groups": [{**good["param_groups"][0], "param_names": ["w"]}]}
    for bad, message in [(huge_step, "step must be a whole number in \\[0, 2\\*\\*62\\)"),
                         (dup_names, "name appears more than once"),
                         (dup_index, "index appears more than once"),
                         (short_names, "1 param_names for 2 params")]:
        with pytest.raises(InvalidArgument, match=message):
            svc.import_state("s", bad)
        assert svc.store.get("s").fingerprint() == before


def test_growing_state_past_the_cap_is_refused(tmp_path: Path) -> None:
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    # param, grad, m, v and each tensor's own bytes
    svc = _service(tmp_path, Limits(max_state_bytes=4 * 4 * n + len(SHAPES) * TENSOR_OVERHEAD))
    svc.create("s", CONFIG)
    before = svc.store.get("s").fingerprint()
    with pytest.raises(ResourceExhausted, match="more bytes of state"):
        svc.set_hyperparameters("s", 0, {"amsgrad": True})  # would add max_exp_avg_sq
    assert svc.store.get("s").fingerprint() == before
    assert "max_exp_avg_sq" not in svc.store.get("s").opt.slots


def test_a_step_waiting_on_a_deleted_session_gets_not_found(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    svc.checkpoint("s")
    session = svc.store.get("s")
    outcome: list[BaseException | None] = []
    session.lock.acquire()  # a step in progress

    def waiter() -> None:
        try:
            svc.checkpoint("s")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)  # the waiter now blocks on the session's lock
    session.end()  # what delete() does under the lock
    svc.store.remove(session)
    svc.checkpoints.delete("s")  # type: ignore[union-attr]
    session.lock.release()
    t.join(10)
    assert isinstance(outcome[0], NotFound)
    assert not (tmp_path / "sessions" / "s").exists()  # not re-created by the waiter
    svc.create("s", CONFIG)  # the id is free again
    svc.delete("s")
    with pytest.raises(NotFound):
        svc.describe("s")


class FullDisk(CheckpointStore):
    def write(self, session: Session) -> CheckpointInfo:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_automatic_checkpoint_does_not_fail_the_step(tmp_path: Path) -> None:
    svc = _service(tmp_path, every=1, store_cls=FullDisk)
    svc.create("s", CONFIG)
    result = svc.step("s", _grads())
    assert result.step == 1 and not result.skipped


def test_shutdown_saves_changes_that_took_no_step(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    svc.step("s", _grads())
    svc.checkpoint("s")
    assert svc.checkpoint_all().saved == ()  # nothing new
    svc.set_hyperparameters("s", 0, {"lr": 0.25})
    assert svc.checkpoint_all().saved == ("s",)
    restored = _service(tmp_path)
    assert restored.describe("s").groups[0]["lr"] == 0.25


def test_checkpoints_of_the_same_step_keep_the_older_one_until_pruned(tmp_path: Path) -> None:
    svc = OptimizerService(SessionStore(CpuBackend(), CheckpointStore(tmp_path, keep=2)))
    svc.start()
    svc.create("s", CONFIG)
    svc.step("s", _grads())
    a = tmp_path / svc.checkpoint("s").path  # replies name it relative to the data dir
    svc.set_hyperparameters("s", 0, {"lr": 0.5})
    b = tmp_path / svc.checkpoint("s").path
    assert a.name[:17] == b.name[:17] and a != b and a.exists()  # same step, both kept
    sdir = tmp_path / "sessions" / "s"
    assert (sdir / "LATEST").read_text() == b.name
    # damage the newest: the server falls back to the older complete one
    (b / "manifest.json").write_text("[1, 2]")
    restored = OptimizerService(SessionStore(CpuBackend(), CheckpointStore(tmp_path)))
    restored.start()
    assert restored.describe("s").groups[0]["lr"] == 1e-3
    (a / "tensors.safetensors").write_bytes(b"torn")
    empty = OptimizerService(SessionStore(CpuBackend(), CheckpointStore(tmp_path)))
    assert empty.start() == []  # no complete checkpoint left: not restored, no crash


def test_a_stalled_client_blocks_neither_checkpoints_nor_deletes(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    release = threading.Event()
    outcome: list[BaseException | None] = []

    def slow_gradients():  # type: ignore[no-untyped-def]
        yield _grads()[0]
        release.wait(10)  # the client stops sending midway
        yield _grads()[1]

    def stepper() -> None:
        try:
            svc.step("s", slow_gradients())
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=stepper)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    assert svc.checkpoint("s").step == 0
    svc.delete("s")
    assert time.monotonic() - t0 < 2.0
    release.set()
    t.join(10)
    assert isinstance(outcome[0], NotFound)


def test_add_tensors_to_a_live_session_survives_a_restart(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    svc.step("s", _grads())
    before = svc.store.get("s").fingerprint()
    for bad, message in [
        ([TensorSpec("w", (2,), 1)], "already in the session: w"),
        ([TensorSpec("new", (2,), 5)], "group 5 does not exist"),
        ([TensorSpec("new", (1 << 41,), 1)], "would exceed"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            svc.add_tensors("s", bad, {"lr": 0.1})
        assert svc.store.get("s").fingerprint() == before
    init = np.arange(4, dtype=np.float32)
    info = svc.add_tensors("s", [TensorSpec("head", (2, 2), 1)], {"lr": 0.1},
                           [TensorChunk("head", (2, 2), "FP32", init.tobytes())])
    assert [t.name for t in info.tensors] == ["w", "b", "head"] and len(info.groups) == 2
    svc.step("s", [TensorChunk("head", (2, 2), "FP32", np.ones(4, np.float32).tobytes())])
    svc.checkpoint("s")
    restored = _service(tmp_path)
    opt = restored.store.get("s").opt
    assert list(opt.seg_step) == [1, 1, 1]
    head = opt.param[opt.layout.span(2)]
    np.testing.assert_allclose(head, init - 0.1, rtol=1e-6)  # one Adam step of lr 0.1


def test_a_new_group_that_turns_on_a_slot_is_counted_against_the_cap(tmp_path: Path) -> None:
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    svc = _service(tmp_path, Limits(max_state_bytes=4 * 4 * (n + 4) + 4 * 2
                                    + (len(SHAPES) + 1) * TENSOR_OVERHEAD))
    svc.create("s", CONFIG)
    before = svc.store.get("s").fingerprint()
    with pytest.raises(ResourceExhausted):  # amsgrad's buffer would span the whole session
        svc.add_tensors("s", [TensorSpec("new", (2,), 1)], {"amsgrad": True})
    assert svc.store.get("s").fingerprint() == before
    svc.add_tensors("s", [TensorSpec("new", (2,), 1)], {"lr": 0.1})  # fits without it
    roomy = _service(tmp_path / "roomy")
    roomy.create("s", CONFIG)
    with pytest.raises(InvalidArgument, match="is not among the tensors being added"):
        roomy.add_tensors("s", [TensorSpec("newer", (2,), 0)], None,
                          [TensorChunk("w", (4, 3), "FP32", bytes(48))])


def test_duplicated_and_reordered_pushes_apply_exactly_once_across_a_restart(
        tmp_path: Path) -> None:
    """Each of 12 pushes from two workers is delivered 1-4 times in a shuffled order, with a
    restart halfway: the state equals applying each push once, in first-arrival order."""
    from adamserve.service import PushId

    rng = np.random.default_rng(9)
    pushes = [(w, k) for k in range(1, 7) for w in ("a", "b")]
    deliveries = [p for p in pushes for _ in range(1 + int(rng.integers(0, 4)))]
    order = rng.permutation(len(deliveries))
    deliveries = [deliveries[i] for i in order]
    grads = {p: _grads(zlib.crc32(repr(p).encode())) for p in pushes}

    svc = _service(tmp_path / "served")
    svc.create("s", CONFIG)
    duplicates = 0
    for n, (w, k) in enumerate(deliveries):
        if n == len(deliveries) // 2:
            svc.checkpoint("s")
            svc = _service(tmp_path / "served")  # a restart: the push log comes back too
        result = svc.step("s", grads[(w, k)], push_id=PushId(w, k))
        duplicates += result.duplicate
    assert duplicates == len(deliveries) - len(pushes)

    reference = _service(tmp_path / "reference")
    reference.create("s", CONFIG)
    first_arrival = list(dict.fromkeys(deliveries))
    for p in first_arrival:
        reference.step("s", grads[p])
    ours, ref = svc.store.get("s").opt, reference.store.get("s").opt
    np.testing.assert_array_equal(ours.param, ref.param)
    for slot in ref.slots:
        np.testing.assert_array_equal(ours.slots[slot], ref.slots[slot])
    assert ours.step_count == len(pushes)


def test_push_ids_are_checked(tmp_path: Path) -> None:
    from adamserve.service import PushId

    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    before = svc.store.get("s").fingerprint()
    for bad, message in [(PushId("", 1), "worker_id ''"), (PushId("w", 0), "sequence 0"),
                         (PushId("w", 1 << 20), "more than 1024 ahead")]:
        with pytest.raises(InvalidArgument, match=message):
            svc.step("s", _grads(), push_id=bad)
    assert svc.store.get("s").fingerprint() == before


def test_a_duplex_step_that_applied_nothing_does_not_use_up_its_push_id(
        tmp_path: Path) -> None:
    from adamserve.service import PushId, StepResult

    svc = _service(tmp_path)
    config = SessionConfig("adam", CONFIG.tensors, skip_nonfinite=False)
    svc.create("s", config)

    def broken():  # type: ignore[no-untyped-def]
        raise ConnectionError("client went away")
        yield  # pragma: no cover

    with pytest.raises(ConnectionError):
        list(svc.step_stream("s", broken(), push_id=PushId("w", 1)))
    out = list(svc.step_stream("s", _grads(), push_id=PushId("w", 1)))  # the resend
    assert isinstance(out[-1], StepResult) and not out[-1].duplicate and out[-1].step == 1


def test_add_tensors_keeps_the_alias_options_and_is_atomic(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", SessionConfig("amsgrad", CONFIG.tensors))
    svc.add_tensors("s", [TensorSpec("new", (2,), 1)], {"lr": 0.1})
    assert [g["amsgrad"] for g in svc.describe("s").groups] == [True, True]

    class Tight(CpuBackend):
        calls = 0

        def zeros(self, n, dtype):  # type: ignore[no-untyped-def]
            Tight.calls += 1
            if Tight.calls > 3:
                raise MemoryError
            return super().zeros(n, dtype)

    svc2 = OptimizerService(SessionStore(Tight(), None))
    Tight.calls = -10**9
    svc2.start()
    svc2.create("s", CONFIG)
    before = svc2.store.get("s").fingerprint()
    Tight.calls = 0  # the third new buffer fails
    with pytest.raises(ResourceExhausted, match="could not allocate"):
        svc2.add_tensors("s", [TensorSpec("new", (2,), 0)])
    opt = svc2.store.get("s").opt
    assert svc2.store.get("s").fingerprint() == before
    assert opt.param.size == opt.grad.size == opt.layout.size == 15
