"""A session over three shard servers equals the same session on one server.

Every algorithm, with the options that need whole-gradient quantities (the
non-finite skip, global and per-tensor clipping, LAMB's trust ratio over tensors
split across shards) and without them (one-phase steps), in float64 so that the
only difference allowed is the order of a few float64 additions. Real servers on
127.0.0.1; the reference is the ``live`` server.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any

import numpy as np
import pytest

from adamserve_client import errors
from adamserve_client.tensors import decode, encode
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect
from adamserve_client.transports.base import Sender, Workers
from adamserve_client.transports.sharded import ShardedTransport, plan_shards

SHAPES = [(7, 5), (33,), (2, 3, 4), (1,), (40,)]
SPECS = tuple(TensorSpec(f"t{i}", s, i % 2) for i, s in enumerate(SHAPES))
STEPS = 6
NAN_STEP = 3  # a NaN in one tensor's gradient: every shard must skip the step

ALGORITHMS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("adam", {"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3}),
    ("adamw", {"lr": 1e-2}, {"weight_decay": 0.3}),
    ("amsgrad", {"lr": 1e-2}, {"beta1": 0.8}),
    ("nadam", {"weight_decay": 0.1}, {"momentum_decay": 1e-2}),
    ("radam", {"lr": 1e-2}, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("adamax", {"weight_decay": 0.05}, {"lr": 1e-2}),
    ("adagrad", {"lr": 0.05, "lr_decay": 0.01}, {"eps": 1e-6}),
    ("rmsprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}, {"alpha": 0.9}),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01}, {"beta1": 0.8}),
    # every tensor whole on one shard (its norms), the exchange's clipping and checks
    ("adafactor", {"lr": 5e-2, "weight_decay": 0.1}, {"beta2_decay": -0.5, "d": 1.5}),
]
OPTIONS: dict[str, dict[str, Any]] = {
    "skip-nonfinite": {},
    "global-clip": {"max_grad_norm": 0.5},
    "per-tensor-clip": {"max_grad_norm": 0.3, "clip_per_tensor": True},
    "one-phase": {"skip_nonfinite": False},
}


def _wire(values: list[np.ndarray]) -> list[WireTensor]:
    return [WireTensor(t.name, t.shape, "FP64", encode(v, "FP64")) for t, v in
            zip(SPECS, values, strict=True)]


def _values(ws: list[WireTensor]) -> dict[str, np.ndarray]:
    return {w.name: decode(w.data, w.datatype).reshape(w.shape) for w in ws}


def _grads(step: int, nan: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + step)
    out = [rng.standard_normal(s) for s in SHAPES]
    if nan:
        out[4][7] = np.nan
    return out


@pytest.fixture(scope="module", params=["grpc", "flight"])
def sharded(shard_servers: list[Any], request: pytest.FixtureRequest) -> Any:
    # split_elements 8: every tensor but the scalar may be cut between shards
    t = ShardedTransport([connect(s.urls[request.param]) for s in shard_servers],
                         split_elements=8)
    yield t
    t.close()


def test_the_plan_splits_large_tensors_and_keeps_order() -> None:
    plan = plan_shards(SPECS, 3, split_elements=8)
    # 133 elements: ranges of 45, 45 and the rest, cutting t1 and t2
    assert [sum(p.end - p.start for p in s) for s in plan.shards] == [45, 45, 43]
    assert any("#" in p.spec.name for shard in plan.shards for p in shard)
    # the pieces, in shard order, cover the flat key space exactly once
    seen = [(p.parent, p.start, p.end) for shard in plan.shards for p in shard]
    flat = [(j, a) for j, a, _ in seen]
    assert flat == sorted(flat)
    for j, t in enumerate(SPECS):
        ends = [(a, b) for k, a, b in seen if k == j]
        assert ends[0][0] == 0 and ends[-1][1] == math.prod(t.shape)
        assert all(ends[i][1] == ends[i + 1][0] for i in range(len(ends) - 1))
    big = plan_shards(SPECS, 3, split_elements=1000)
    assert all("#" not in p.spec.name for shard in big.shards for p in shard)
    with pytest.raises(ValueError, match="empty"):
        plan_shards(SPECS[:2], 3, split_elements=1000)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("algorithm,group0,group1", ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
def test_three_shards_equal_one_server(live: Any, sharded: ShardedTransport, sid: str,
                                       algorithm: str, group0: dict[str, Any],
                                       group1: dict[str, Any], option: str) -> None:
    opts = OPTIONS[option]  # LAMB exchanges even in "one-phase": its trust ratio
    spec = SessionSpec(sid, algorithm, SPECS, (group0, group1), dtype="float64", **opts)
    rng = np.random.default_rng(7)
    initial = _wire([rng.standard_normal(s) for s in SHAPES])
    one = connect(live.urls["grpc"])
    try:
        one.create_session(spec, initial)
        sharded.create_session(spec, initial)
        nan_step = NAN_STEP if spec.skip_nonfinite else -1
        for step in range(STEPS):
            grads = _wire(_grads(step, step == nan_step))
            a = one.step(sid, grads, return_datatype="FP64")
            b = sharded.step(sid, grads, return_datatype="FP64")
            assert (b.step, b.skipped) == (a.step, a.skipped)
            assert b.nonfinite == a.nonfinite
            if a.grad_norm is not None and not a.skipped:
                assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-12)
            va, vb = _values(list(a.params)), _values(list(b.params))
            assert list(vb) == list(va)
            for name in va:
                np.testing.assert_allclose(vb[name], va[name], rtol=1e-12, atol=1e-14,
                                           err_msg=f"{algorithm} {option} step {step} {name}")
        assert sharded.describe(sid).step == one.describe(sid).step
    finally:
        one.delete_session(sid)
        one.close()
        sharded.delete_session(sid)


def test_state_dict_and_checkpoints_span_the_shards(live: Any, sharded: ShardedTransport,
                                                    sid: str) -> None:
    spec = SessionSpec(sid, "adamw", SPECS, ({}, {"lr": 1e-2}), dtype="float64")
    one = connect(live.urls["grpc"])
    try:
        one.create_session(spec)
        info = sharded.create_session(spec)
        assert [t.name for t in info.tensors] == [t.name for t in SPECS]
        for step in range(3):
            grads = _wire(_grads(step, False))
            one.step(sid, grads)
            sharded.step(sid, grads)
        mine, theirs = sharded.export_state(sid), one.export_state(sid)
        assert sorted(mine["state"]) == sorted(theirs["state"])
        for idx, entry in theirs["state"].items():
            for key, value in entry.items():
                np.testing.assert_allclose(np.asarray(mine["state"][idx][key]),
                                           np.asarray(value), rtol=1e-12)
        ckpt = sharded.checkpoint(sid)
        assert ckpt.step == 3 and sharded.list_checkpoints(sid) == [3]
        before = _values(sharded.pull(sid, datatype="FP64"))
        for step in range(3, 5):
            sharded.step(sid, _wire(_grads(step, False)))
        # a state_dict sent back restores the moments of every piece
        sharded.import_state(sid, mine)
        assert sharded.export_state(sid)["state"][0]["exp_avg"].tolist() == \
            mine["state"][0]["exp_avg"].tolist()
        info = sharded.restore_checkpoint(sid, 3)
        assert info.step == 3
        after = _values(sharded.pull(sid, datatype="FP64"))
        for name, value in before.items():
            np.testing.assert_array_equal(after[name], value)
        with pytest.raises(errors.NotFound, match="no complete checkpoint of step 4"):
            sharded.restore_checkpoint(sid, 4)
    finally:
        one.delete_session(sid)
        one.close()
        sharded.delete_session(sid)


def test_shards_listed_out_of_order_are_refused(shard_servers: list[Any], sid: str) -> None:
    urls = [s.urls["http"] for s in shard_servers]
    right = ShardedTransport([connect(u) for u in urls], split_elements=8)
    wrong = ShardedTransport([connect(u) for u in reversed(urls)], split_elements=8)
    try:
        right.create_session(SessionSpec(sid, "adam", SPECS, ({}, {})))
        with pytest.raises(errors.FailedPrecondition, match="shard order") as e:
            wrong.describe(sid)
        assert e.value.reason == "SHARD_ORDER" and e.value.metadata["session_id"] == sid
        # each shard takes every step: each needs a gradient for one of its tensors
        with pytest.raises(ValueError, match="no gradient for t1"):
            right.step(sid, _wire(_grads(0, False))[:1])
    finally:
        right.delete_session(sid)
        right.close()
        wrong.close()


def test_http_shards_exchange_non_finite_sums(live: Any, shard_servers: list[Any],
                                              sid: str) -> None:
    """The commit's sums travel as JSON over HTTP, NaN included (a skipped step)."""
    http = ShardedTransport([connect(s.urls["http"]) for s in shard_servers], split_elements=8)
    one = connect(live.urls["http"])
    spec = SessionSpec(sid, "lamb", SPECS, ({}, {"lr": 1e-2}), dtype="float64",
                       max_grad_norm=1.0)
    try:
        one.create_session(spec)
        http.create_session(spec)
        for step in range(4):
            grads = _wire(_grads(step, step == 2))
            a = one.step(sid, grads, return_datatype="FP64")
            b = http.step(sid, grads, return_datatype="FP64")
            assert (b.step, b.skipped, b.nonfinite) == (a.step, a.skipped, a.nonfinite)
            va, vb = _values(list(a.params)), _values(list(b.params))
            for name in va:
                np.testing.assert_allclose(vb[name], va[name], rtol=1e-12, atol=1e-14)
    finally:
        one.delete_session(sid)
        one.close()
        http.delete_session(sid)
        http.close()


def test_shards_at_different_steps_refuse_to_step_until_restored(
        shard_servers: list[Any], sid: str) -> None:
    """One shard rolled back alone (as a shard restarted from an older checkpoint is):
    the sharded session refuses to step, naming each shard's step, until every shard is
    restored to a step they all hold."""
    urls = [s.urls["grpc"] for s in shard_servers]
    spec = SessionSpec(sid, "adam", SPECS, ({}, {}))
    sharded = ShardedTransport([connect(u) for u in urls], split_elements=8)
    try:
        sharded.create_session(spec)
        sharded.step(sid, _wire(_grads(0, False)))
        assert sharded.checkpoint(sid).step == 1
        sharded.step(sid, _wire(_grads(1, False)))
        with connect(urls[0]) as first:
            first.restore_checkpoint(sid, 1)
        again = ShardedTransport([connect(u) for u in urls], split_elements=8)
        try:
            assert again.describe(sid).step == 1
            with pytest.raises(errors.FailedPrecondition,
                               match=r"different steps .*: 1, .*: 2") as e:
                again.step(sid, _wire(_grads(1, False)))
            assert e.value.reason == "SHARDS_DIVERGED" and e.value.metadata["steps"] == "1,2,2"
            assert again.restore_checkpoint(sid, 1).step == 1
            assert again.step(sid, _wire(_grads(1, False))).step == 2
        finally:
            again.close()
    finally:
        sharded.delete_session(sid)
        sharded.close()


def test_adamserve_shards_names_the_shards_of_an_optimizer(
        shard_servers: list[Any], sid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import adamserve_client as ac

    monkeypatch.setenv("ADAMSERVE_SHARDS", ",".join(s.urls["grpc"] for s in shard_servers))
    w, b, c = np.zeros((4, 3), np.float32), np.zeros(5, np.float32), np.zeros(7, np.float32)
    opt = ac.Adam([w, b, c], lr=0.1, session=sid)  # one tensor on each shard
    try:
        assert isinstance(opt.transport, ShardedTransport)
        assert len(opt.transport.shards) == 3
        opt.step([np.ones_like(w), -np.ones_like(b), np.ones_like(c)])
        np.testing.assert_allclose(w, -0.1, rtol=1e-6)
        np.testing.assert_allclose(b, 0.1, rtol=1e-6)
    finally:
        opt.close(delete=True)


def test_a_sharded_torch_optimizer_matches_torch_and_its_state_dict(
        shard_servers: list[Any], sid: str) -> None:
    import torch

    import adamserve_client as ac

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ref_net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 2))
    ref_net.load_state_dict(net.state_dict())
    shards = ShardedTransport([connect(s.urls["grpc"]) for s in shard_servers],
                              split_elements=16)  # the 128-element weight is cut
    opt = ac.AdamW(net.named_parameters(), lr=1e-2, server=shards, session=sid)
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2)
    try:
        for _ in range(3):
            x = torch.randn(4, 8)
            for model, o in ((net, opt), (ref_net, ref)):
                o.zero_grad()
                model(x).pow(2).sum().backward()
                o.step()
        for mine, theirs in zip(net.parameters(), ref_net.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        sd, rsd = opt.state_dict(), ref.state_dict()
        assert sorted(sd["state"]) == sorted(rsd["state"])
        for k, entry in rsd["state"].items():
            for slot in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sd["state"][k][slot], entry[slot], rtol=1e-5,
                                           atol=1e-7)
        opt.load_state_dict(rsd)  # torch's own state_dict, split across the shards
        torch.testing.assert_close(opt.state_dict()["state"][2]["exp_avg"],
                                   rsd["state"][2]["exp_avg"])
    finally:
        opt.close(delete=True)
        shards.close()


def test_sharded_edge_cases(shard_servers: list[Any], sid: str) -> None:
    urls = [s.urls["grpc"] for s in shard_servers[:2]]
    sharded = ShardedTransport([connect(u) for u in urls], split_elements=8)
    try:
        # a shard whose only tensor is empty still takes every step
        specs = (TensorSpec("w", (4,)), TensorSpec("empty", (0,)))
        sharded.create_session(SessionSpec(sid, "adam", specs))
        grads = [WireTensor("w", (4,), "FP32", encode(np.ones(4, np.float32), "FP32")),
                 WireTensor("empty", (0,), "FP32", b"")]
        assert sharded.step(sid, grads).step == 1
        # a state_dict without state for some tensors: every shard takes its step
        state = sharded.export_state(sid)
        sharded.import_state(sid, {"state": {}, "param_groups": state["param_groups"]})
        assert {i.step for i in sharded.each(lambda i, t: t.describe(sid))} == {0}
        sharded.import_state(sid, state)
        assert {i.step for i in sharded.each(lambda i, t: t.describe(sid))} == {1}
        sharded.delete_session(sid)
        for workers in (Workers(2, mode="async"), Workers(2, straggler_timeout=5.0)):
            with pytest.raises(ValueError, match="synchronous rounds without a straggler"):
                sharded.create_session(SessionSpec(sid, "adam", specs, workers=workers))
    finally:
        with contextlib.suppress(errors.NotFound):
            sharded.delete_session(sid)
        sharded.close()


def test_workers_change_on_every_shard_or_on_none(shard_servers: list[Any], sid: str) -> None:
    urls = [s.urls["grpc"] for s in shard_servers[:2]]
    spec = SessionSpec(sid, "adam", SPECS, ({}, {}), workers=Workers(2))
    sharded = ShardedTransport([connect(u) for u in urls], split_elements=8)
    try:
        sharded.create_session(spec)
        plan = plan_shards(SPECS, 2, 8)
        # a push waits on shard 0's round (and stays in it): shard 1 has none
        with connect(urls[0], timeout=0.3) as shard0, pytest.raises(errors.DeadlineExceeded):
            shard0.push(sid, [WireTensor(p.spec.name, p.spec.shape, "FP32",
                                         bytes(4 * math.prod(p.spec.shape)))
                              for p in plan.shards[0]], sender=Sender("w", 1))
        with pytest.raises(errors.FailedPrecondition, match="between steps"):
            sharded.set_workers(sid, 3)
        counts = [i.workers.count for i in sharded.each(lambda i, t: t.describe(sid))]
        assert counts == [2, 2]
    finally:
        sharded.delete_session(sid)
        sharded.close()


def test_workers_that_create_one_sharded_session_at_once_all_attach(
        shard_servers: list[Any], sid: str) -> None:
    import adamserve_client as ac
    from tests.concurrency import in_threads

    urls = [s.urls["grpc"] for s in shard_servers]
    init = [np.full(s, 0.5, np.float32) for s in SHAPES]
    barrier = threading.Barrier(4)
    opts: list[Any] = [None] * 4

    def worker(rank: int) -> None:
        barrier.wait(10)
        opts[rank] = ac.Adam([p.copy() for p in init], lr=0.1, session=sid, workers=4,
                             worker_id=f"w{rank}", server=ShardedTransport(
                                 [connect(u) for u in urls], split_elements=8))
        opts[rank].step([g.astype(np.float32) for g in _grads(rank, False)])

    try:
        assert in_threads(*(lambda r=r: worker(r) for r in range(4))) == [None] * 4
        first = opts[0].param_groups[0]["params"]
        for o in opts[1:]:
            for a, b in zip(o.param_groups[0]["params"], first, strict=True):
                np.testing.assert_array_equal(a, b)
    finally:
        for o in opts:
            if o is not None:
                o.close(delete=False)
                o.transport.close()
        with ShardedTransport([connect(u) for u in urls]) as t:
            t.delete_session(sid)
