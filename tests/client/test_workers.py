"""Several workers on one session through the client, over both transports: optimizers
given ``workers=K`` share a session whose steps are the mean of their gradients; the
round and staleness errors arrive as the client's exceptions."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import pytest

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.tensors import encode
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect
from adamserve_client.transports.base import Sender, Workers
from tests.concurrency import in_threads

SHAPES = [(5, 4), (4,)]


def _grads(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def test_two_optimizers_step_as_one_on_the_mean_gradient(url: str, sid: str) -> None:
    init = [np.ones(s, np.float32) for s in SHAPES]
    workers = [ac.Adam([p.copy() for p in init], lr=0.1, server=url, session=sid, workers=2,
                       worker_id=f"w{i}") for i in range(2)]
    single = ac.Adam([p.copy() for p in init], lr=0.1, server=url)
    try:
        for step in range(3):
            grads = [_grads(10 * step + i) for i in range(2)]
            out = in_threads(*(lambda i=i, g=grads: workers[i].step(g[i]) for i in range(2)))
            assert out == [None, None], out
            single.step([(a + b) / np.float32(2) for a, b in zip(*grads, strict=True)])
            for w in workers:
                assert w.last_step is not None and w.last_step.contributors == 2
                for mine, ref in zip(w.param_groups[0]["params"],
                                     single.param_groups[0]["params"], strict=True):
                    np.testing.assert_array_equal(mine, ref)
        info = workers[0].set_workers(3)
        assert info.workers.count == 3 and info.step == 3
    finally:
        for w in workers:
            w.close(delete=False)
        single.close()
        with connect(url) as t:
            t.delete_session(sid)


def test_round_and_staleness_errors_cross_both_wires(url: str, sid: str) -> None:
    specs = tuple(TensorSpec(f"t{i}", s) for i, s in enumerate(SHAPES))

    def wire(seed: int) -> list[WireTensor]:
        return [WireTensor(t.name, t.shape, "FP32", encode(g, "FP32"))
                for t, g in zip(specs, _grads(seed), strict=True)]

    with connect(url) as t:
        t.create_session(SessionSpec(sid, "adam", specs,
                                     workers=Workers(count=2, straggler_timeout=0.2)))
        pushed = t.push(sid, wire(0), sender=Sender("a", 1), base_step=0)
        assert pushed.pending and pushed.step == 0
        with pytest.raises(errors.DeadlineExceeded, match="waiting for step 1"):
            t.pull(sid, min_step=1, wait=0.05)
        with pytest.raises(errors.Aborted, match="1 of 2 workers pushed within the straggler "
                                                 "timeout") as aborted:
            t.pull(sid, min_step=1, wait=10)
        assert aborted.value.reason == "ROUND_ABORTED"
        done = in_threads(lambda: t.step(sid, wire(1), sender=Sender("a", 1), base_step=0),
                        lambda: t.step(sid, wire(2), sender=Sender("b", 1), base_step=0))
        assert [r.step for r in done] == [1, 1], done
        assert [w.name for w in t.pull(sid, min_step=1)] == ["t0", "t1"]
        with pytest.raises(errors.FailedPrecondition, match="too late") as late:
            t.push(sid, wire(3), sender=Sender("c", 1), base_step=0)
        assert late.value.reason == "STALE_PUSH"
        t.delete_session(sid)

        t.create_session(SessionSpec(sid, "adam", specs,
                                     workers=Workers(mode="async", max_staleness=0)))
        assert t.step(sid, wire(0), base_step=0).staleness == 0
        with pytest.raises(errors.FailedPrecondition, match="1 steps stale") as stale:
            t.step(sid, wire(1), base_step=0)
        assert stale.value.reason == "STALE_PUSH"
        info = t.describe(sid)
        assert (info.workers.mode, info.workers.max_staleness, info.step) == ("async", 0, 1)
        assert t.list_checkpoints(sid) == []
        t.checkpoint(sid)
        assert t.list_checkpoints(sid) == [1]
        t.step(sid, wire(2), base_step=1)
        assert t.restore_checkpoint(sid, 1).step == 1
        t.delete_session(sid)


def test_bad_worker_settings_are_refused_with_their_field(url: str, sid: str) -> None:
    specs = (TensorSpec("w", (3,)),)
    with connect(url) as t:
        for workers, message in [
                (Workers(mode="sometimes"), "mode"),
                (Workers(straggler_policy="wait"), "straggler_policy"),
                (Workers(mode="async", exchange=True), "cannot be combined with exchange"),
                (Workers(straggler_timeout=-1.0), "straggler_timeout")]:
            with pytest.raises(errors.InvalidArgument, match=message):
                t.create_session(SessionSpec(sid, "adam", specs, workers=workers))
        t.create_session(SessionSpec(sid, "adam", specs))
        with pytest.raises(errors.FailedPrecondition, match="has no step waiting for a commit"):
            t.commit(sid, 1, [0.0], 0.0)
        with pytest.raises(errors.FailedPrecondition, match="commits its steps itself") as own:
            ac.ShardedTransport([t]).commit(sid, 1, [0.0], 0.0)
        assert own.value.reason == "SESSION_SHARDED"
        with pytest.raises(errors.InvalidArgument, match=r"(count|workers): .*(greater than or equal to 1|expected 1 to 512)"):
            t.set_workers(sid, 0)
        with pytest.raises(errors.NotFound, match="no complete checkpoint of step 5"):
            t.restore_checkpoint(sid, 5)
        t.delete_session(sid)


@pytest.mark.parametrize("algorithm,world,steps", [("adamw", 4, 10), ("lamb", 2, 3)])
def test_workers_of_a_sharded_session_commit_each_step_once(
        live: Any, shard_servers: list[Any], sid: str, algorithm: str, world: int,
        steps: int) -> None:
    """Workers on a two-shard session: each relays the same sums to every shard, the
    first commit applies the step and the others get the same outcome (also a worker
    whose push is answered only after another's commit applied the step); the result
    is one server's step on the mean gradient."""
    shapes = [(6, 5), (30,)]
    init = [np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s) for s in shapes]
    urls = [s.urls["grpc"] for s in shard_servers[:2]]

    def shards() -> ac.ShardedTransport:
        return ac.ShardedTransport([connect(u) for u in urls], split_elements=8)

    cls = ac.LAMB if algorithm == "lamb" else ac.AdamW
    workers = [cls([p.copy() for p in init], lr=0.05, server=shards(), session=sid,
                   workers=world, worker_id=f"w{i}") for i in range(world)]
    single = cls([p.copy() for p in init], lr=0.05, server=live.urls["grpc"])
    try:
        for step in range(steps):
            rng = np.random.default_rng(step)
            grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes]
                     for _ in range(world)]
            out = in_threads(*(lambda i=i, g=grads: workers[i].step(g[i])
                             for i in range(world)))
            assert out == [None] * world, out
            single.step([sum(g[k] for g in grads) / np.float32(world)
                         for k in range(len(shapes))])
            for w in workers:
                for mine, ref in zip(w.param_groups[0]["params"],
                                     single.param_groups[0]["params"], strict=True):
                    np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-7)
        assert workers[0].describe().step == steps
    finally:
        for w in workers:
            w.close(delete=False)
        workers[0].transport.delete_session(sid)
        for w in workers:
            w.transport.close()
        single.close()


def test_a_restarted_worker_goes_on_where_the_session_is(url: str, sid: str) -> None:
    """A named worker numbers its pushes by step: after a restart (a new optimizer with
    the same worker_id, attaching to the session at step 2) its pushes are new ones, not
    taken for resent old ones; its resent last push is still recognised."""
    init = [np.ones(s, np.float32) for s in SHAPES]

    def worker(name: str) -> ac.Adam:
        return ac.Adam([p.copy() for p in init], lr=0.1, server=url, session=sid, workers=2,
                       worker_id=name)

    a, b = worker("a"), worker("b")
    try:
        for step in range(2):
            g = _grads(step)
            assert in_threads(lambda g=g: a.step(g), lambda g=g: b.step(g)) == [None, None]
        a.close(delete=False)
        a = worker("a")  # restarted: attaches at step 2
        assert a.describe().step == 2
        assert in_threads(lambda: a.step(_grads(7)), lambda: b.step(_grads(8))) == [None, None]
        assert a.last_step is not None and a.last_step.contributors == 2
        assert a.describe().step == 3
        with connect(url) as t:  # a's push for step 3, resent: acknowledged only
            again = t.step(sid, [WireTensor(f"param.{i}", s, "FP32", encode(g, "FP32"))
                                 for i, (s, g) in enumerate(zip(SHAPES, _grads(7),
                                                                strict=True))],
                           sender=Sender("a", 3), base_step=2)
            assert again.duplicate and again.step == 3
    finally:
        a.close(delete=False)
        b.close(delete=True)


def test_async_workers_never_apply_a_push_staler_than_the_bound(url: str, sid: str) -> None:
    """Three async workers race: every applied push was at most one step stale, every
    refused one says so and changed nothing, and the session counts exactly the applied
    pushes."""
    init = [np.zeros(s, np.float32) for s in SHAPES]
    opts = [ac.Adam([p.copy() for p in init], lr=0.01, server=url, session=sid,
                    workers=Workers(3, mode="async", max_staleness=1), worker_id=f"w{i}")
            for i in range(3)]
    applied: list[int] = []
    refused = [0]
    lock = threading.Lock()

    def work(opt: ac.Adam, seed: int) -> None:
        for k in range(8):
            try:
                opt.step(_grads(100 * seed + k))
            except errors.FailedPrecondition as exc:
                assert "steps stale" in str(exc)
                with lock:
                    refused[0] += 1
                opt.pull()
                continue
            assert opt.last_step is not None
            with lock:
                applied.append(opt.last_step.staleness)

    try:
        assert in_threads(*(lambda o=o, i=i: work(o, i) for i, o in enumerate(opts))) == \
            [None] * 3
        assert all(s <= 1 for s in applied) and len(applied) + refused[0] == 24
        assert opts[0].describe().step == len(applied)
    finally:
        for o in opts[1:]:
            o.close(delete=False)
        opts[0].close(delete=True)


def test_attaching_with_another_worker_count_changes_it_and_another_mode_is_refused(
        url: str, sid: str) -> None:
    init = [np.ones(s, np.float32) for s in SHAPES]
    first = ac.Adam([p.copy() for p in init], lr=0.1, server=url, session=sid, workers=4)
    try:
        again = ac.Adam([p.copy() for p in init], lr=0.1, server=url, session=sid, workers=2)
        assert again.describe().workers.count == 2  # the job came back with 2 workers
        again.close(delete=False)
        with pytest.raises(ValueError, match="only the count may change"):
            ac.Adam([p.copy() for p in init], lr=0.1, server=url, session=sid,
                    workers=Workers(2, mode="async"))
    finally:
        first.close(delete=True)


def test_a_named_worker_goes_on_after_loading_an_older_state_dict(url: str, sid: str) -> None:
    """Loading a state_dict moves the session to its step; the named worker's next pushes
    are new ones there, not taken for the ones it sent before."""
    w = np.ones(SHAPES[0], np.float32)
    opt = ac.Adam([w], lr=0.1, server=url, session=sid, worker_id="rank0")
    try:
        for k in range(3):
            opt.step([_grads(k)[0]])
        saved = opt.state_dict()
        for k in range(3, 6):
            opt.step([_grads(k)[0]])
        assert opt.describe().step == 6
        opt.load_state_dict(saved)
        assert opt.describe().step == 3
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "applied before" warning: all new
            for k in range(3, 6):
                opt.step([_grads(k)[0]])
        assert opt.describe().step == 6
    finally:
        opt.close(delete=True)
