"""Steps through same-host shared memory, from the Python client, against real servers.

A step with ``shared_memory=True`` writes its gradients into a region, names it in
the step's header and reads the parameters back from it; the results are bitwise
those of the same steps over the wire (fp32 and bf16). A server that cannot use the
region (started without --allow-shared-memory) gets the steps over the wire after
one warning; a server that forgot the region (swept, restarted) gets it registered
again; a sharded session uses one region across its shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.shared_memory import SHM_DIR, StepRegion
from adamserve_client.tensors import encode
from adamserve_client.transports import SessionSpec, StepResult, TensorSpec, WireTensor, connect
from adamserve_client.transports.base import RegionRef, Sender
from adamserve_client.transports.grpc import GrpcTransport
from adamserve_client.transports.sharded import ShardedTransport, plan_shards, shard_places
from tests.client.conftest import TRANSPORTS, Live


class Recording(GrpcTransport):
    """The real gRPC transport, noting what each step carried."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.steps: list[tuple[int, RegionRef | None, RegionRef | None]] = []

    def step(self, session_id: str, gradients: Sequence[WireTensor], *,
             gradients_region: RegionRef | None = None,
             params_region: RegionRef | None = None, **kw: Any) -> StepResult:
        self.steps.append((len(gradients), gradients_region, params_region))
        return super().step(session_id, gradients, gradients_region=gradients_region,
                            params_region=params_region, **kw)


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def backward(m: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(12, 6, generator=g)
    m(x).pow(2).mean().backward()


def train(m: torch.nn.Module, opt: Any, steps: int) -> list[list[torch.Tensor]]:
    """The parameters after each step."""
    seen = []
    for step in range(steps):
        opt.zero_grad()
        backward(m, step)
        opt.step()
        seen.append([p.detach().clone() for p in m.parameters()])
    return seen


def assert_bitwise(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for step, (xs, ys) in enumerate(zip(a, b, strict=True)):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y), f"step {step + 1} differs"


def _objects() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("adamserve_")}


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
def test_steps_through_shared_memory_equal_steps_over_the_wire(
        shm_servers: list[Live], live: Live, sid: str, wire_dtype: str) -> None:
    transport = Recording(shm_servers[0].urls["grpc"])
    m, ref_m = model(), model()
    opt = ac.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, server=transport,
                   session=sid, wire_dtype=wire_dtype, shared_memory=True)
    ref = ac.AdamW(ref_m.parameters(), lr=1e-2, weight_decay=0.1, server=live.urls["grpc"],
                   wire_dtype=wire_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got = train(m, opt, 4)
    assert_bitwise(got, train(ref_m, ref, 4))
    region = opt._session.region
    assert region is not None
    assert transport.steps == [(0, region.gradients, region.params)] * 4
    assert region.region.key in {r.name for r in transport.list_shared_memory()}
    opt.close(delete=True)
    ref.close()
    assert region.region.key not in _objects()  # unlinked
    assert region.region.key not in {r.name for r in shm_servers[0].service.list_shared_memory()}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_steps_through_shared_memory(shm_servers: list[Live], live: Live,
                                                     transport: str) -> None:
    m, ref_m = model(), model()
    opt = ac.Adam(m.parameters(), lr=1e-2, server=shm_servers[0].urls[transport],
                  shared_memory=True)
    ref = ac.Adam(ref_m.parameters(), lr=1e-2, server=live.urls[transport])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got = train(m, opt, 3)
    assert_bitwise(got, train(ref_m, ref, 3))
    region = opt._session.region
    assert region is not None
    assert region.region.key in {r.name for r in opt.transport.list_shared_memory()}
    opt.close()
    ref.close()
    assert region.region.key not in {r.name for r in shm_servers[0].service.list_shared_memory()}
    # and the server without the switch says so over this transport too
    fallback = ac.Adam(model().parameters(), server=live.urls[transport], shared_memory=True)
    with pytest.warns(RuntimeWarning, match="SHARED_MEMORY_DISABLED|does not allow it"):
        _one_step(fallback)
    fallback.close()


def _one_step(opt: Any) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


def test_numpy_parameters_over_shared_memory(shm_servers: list[Live], live: Live) -> None:
    rng = np.random.default_rng(3)
    start = [rng.standard_normal((5, 4)), rng.standard_normal(7)]
    ws = [x.copy() for x in start]
    refs = [x.copy() for x in start]
    opt = ac.Adam(ws, lr=1e-2, server=shm_servers[0].urls["grpc"], shared_memory=True)
    ref = ac.Adam(refs, lr=1e-2, server=live.urls["grpc"])
    for step in range(3):
        grads = [np.sin(x * (step + 1)) for x in start]
        opt.step(grads)
        ref.step([g.copy() for g in grads])
        for a, b in zip(ws, refs, strict=True):
            assert a.tobytes() == b.tobytes()
    assert opt._session.region is not None and opt._session.master == "FP64"
    opt.close()
    ref.close()


def test_the_switch_comes_from_the_environment(shm_servers: list[Live],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    m = model()
    monkeypatch.setenv("ADAMSERVE_SHARED_MEMORY", "1")
    opt = ac.Adam(m.parameters(), server=shm_servers[0].urls["grpc"])
    train(m, opt, 1)
    assert opt._session.region is not None
    opt.close()
    monkeypatch.setenv("ADAMSERVE_SHARED_MEMORY", "0")
    off = ac.Adam(m.parameters(), server=shm_servers[0].urls["grpc"])
    train(m, off, 1)
    assert off._session.region is None
    off.close()


def test_a_server_without_shared_memory_gets_the_steps_over_the_wire(
        live: Live, shm_servers: list[Live]) -> None:
    m, ref_m = model(), model()
    before = _objects()
    opt = ac.Adam(m.parameters(), lr=1e-2, server=live.urls["grpc"], shared_memory=True)
    ref = ac.Adam(ref_m.parameters(), lr=1e-2, server=shm_servers[0].urls["grpc"])
    with pytest.warns(RuntimeWarning, match="does not allow it.*--allow-shared-memory") as w:
        got = train(m, opt, 3)
    assert len(w) == 1  # once, not every step
    assert_bitwise(got, train(ref_m, ref, 3))
    assert opt._session.region is None and _objects() == before  # nothing left behind
    opt.close()
    ref.close()


def test_steps_missing_a_gradient_go_over_the_wire(shm_servers: list[Live], live: Live) -> None:
    transport = Recording(shm_servers[0].urls["grpc"])
    m, ref_m = model(), model()
    opt = ac.Adam(m.parameters(), lr=1e-2, server=transport, shared_memory=True)
    ref = ac.Adam(ref_m.parameters(), lr=1e-2, server=live.urls["grpc"])
    for mm, o in ((m, opt), (ref_m, ref)):
        o.zero_grad()
        backward(mm, 0)
        mm[2].bias.grad = None  # torch skips a parameter without a gradient
        o.step()
    for p, q in zip(m.parameters(), ref_m.parameters(), strict=True):
        assert torch.equal(p, q)
    (sent,) = transport.steps
    assert sent == (3, None, None)
    opt.close()
    ref.close()


def test_a_region_the_server_dropped_is_registered_again(shm_servers: list[Live]) -> None:
    server = shm_servers[0]
    m = model()
    transport = Recording(server.urls["grpc"])
    opt = ac.Adam(m.parameters(), server=transport, shared_memory=True)
    train(m, opt, 1)
    region = opt._session.region
    assert region is not None
    # unused for longer than the server keeps regions: swept
    registry = server.service.shared_memory
    assert registry.sweep(now=time.monotonic() + registry.idle_seconds + 1) >= 1
    assert region.region.key not in {r.name for r in server.service.list_shared_memory()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(m, opt, 2)
    assert opt._session.region is region and opt.describe().step == 3
    assert transport.steps[-1] == (0, region.gradients, region.params)
    opt.close()


def test_a_new_parameter_group_gets_a_new_region(shm_servers: list[Live], live: Live) -> None:
    m, ref_m = model(), model()
    extra, ref_extra = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref_extra.load_state_dict(extra.state_dict())
    opt = ac.Adam(m.parameters(), lr=1e-2, server=shm_servers[0].urls["grpc"],
                  shared_memory=True)
    ref = ac.Adam(ref_m.parameters(), lr=1e-2, server=live.urls["grpc"])
    assert_bitwise(train(m, opt, 1), train(ref_m, ref, 1))
    first = opt._session.region
    assert first is not None
    opt.add_param_group({"params": list(extra.parameters()), "lr": 5e-3})
    ref.add_param_group({"params": list(ref_extra.parameters()), "lr": 5e-3})
    assert first.region.closed and first.region.key not in _objects()
    for step in range(2):
        for mm, e, o in ((m, extra, opt), (ref_m, ref_extra, ref)):
            o.zero_grad()
            backward(mm, step)
            e(torch.ones(4, 3)).sum().backward()
            o.step()
    for p, q in zip([*m.parameters(), *extra.parameters()],
                    [*ref_m.parameters(), *ref_extra.parameters()], strict=True):
        assert torch.equal(p, q)
    second = opt._session.region
    assert second is not None and second is not first
    assert second.nbytes == 4 * sum(p.numel() for p in [*m.parameters(), *extra.parameters()])
    opt.close()
    ref.close()


def test_a_large_session_steps_through_the_stream(shm_servers: list[Live], live: Live) -> None:
    # 1.25M elements: its parameters do not fit a StepUnary reply (4 MiB)
    w, ref_w = np.zeros(1_250_000, np.float32), np.zeros(1_250_000, np.float32)
    opt = ac.Adam([w], lr=1e-2, server=shm_servers[0].urls["grpc"], shared_memory=True)
    ref = ac.Adam([ref_w], lr=1e-2, server=live.urls["grpc"])
    for step in range(2):
        g = np.cos(np.arange(w.size, dtype=np.float32) * (step + 1))
        opt.step([g])
        ref.step([g.copy()])
        assert w.tobytes() == ref_w.tobytes()
    opt.close()
    ref.close()


# -- the transport -----------------------------------------------------------------


def _spec(sid: str, **kw: Any) -> SessionSpec:
    return SessionSpec(sid, "adam", (TensorSpec("a", (3, 4)), TensorSpec("b", (5,))),
                       groups=({"lr": 1e-2},), **kw)


def test_the_transport_refuses_misuse_with_the_servers_reasons(shm_servers: list[Live],
                                                                sid: str) -> None:
    with connect(shm_servers[0].urls["grpc"]) as t:
        t.create_session(_spec(sid))
        region = StepRegion(t, [("a", (3, 4)), ("b", (5,))], "FP32")
        grads = [WireTensor("a", (3, 4), "FP32", encode(np.ones(12), "FP32")),
                 WireTensor("b", (5,), "FP32", encode(np.ones(5), "FP32"))]
        with pytest.raises(errors.InvalidArgument, match="one way"):
            t.step(sid, grads, gradients_region=region.gradients)
        with pytest.raises(errors.InvalidArgument) as info:
            t.step(sid, (), gradients_region=RegionRef(region.region.key, 70, 68))
        assert info.value.reason == "SHARED_MEMORY_OUT_OF_RANGE"
        with pytest.raises(errors.InvalidArgument, match="expected 68"):
            t.step(sid, (), gradients_region=RegionRef(region.region.key, 0, 64))
        with pytest.raises(errors.NotFound) as missing:
            t.step(sid, (), gradients_region=RegionRef("nope", 0, 68))
        assert missing.value.reason == "SHARED_MEMORY_NOT_FOUND"
        with pytest.raises(errors.NotFound) as absent:
            t.register_shared_memory("r", "adamserve_no_such_object", 64)
        assert absent.value.reason == "SHARED_MEMORY_NOT_FOUND"
        with pytest.raises(errors.AlreadyExists) as taken:
            t.register_shared_memory(region.region.key, region.region.key, 64)
        assert taken.value.reason == "SHARED_MEMORY_EXISTS"
        with pytest.raises(errors.InvalidArgument, match="not starting with"):
            t.register_shared_memory("../x", region.region.key, 64)
        assert t.describe(sid).step == 0  # every refusal changed nothing
        region.write_gradients(grads)
        pushed = t.push(sid, (), gradients_region=region.gradients, sender=Sender("w", 1))
        assert pushed.step == 1 and pushed.params == ()
        region.close(t)
        with pytest.raises(errors.NotFound):
            t.unregister_shared_memory(region.region.key)
        t.delete_session(sid)


def test_a_client_that_exits_leaves_nothing_behind(shm_servers: list[Live]) -> None:
    server = shm_servers[0]
    script = textwrap.dedent(f"""
        import numpy as np, adamserve_client as ac
        w = np.zeros(10, np.float32)
        opt = ac.Adam([w], server={server.urls["grpc"]!r}, shared_memory=True)
        opt.step([np.ones(10, np.float32)])
        print(opt._session.region.region.key, flush=True)
        # exits without close(): the region is unlinked at interpreter exit
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    key = out.stdout.split()[-1]
    assert key not in _objects()
    server.service.sweep_shared_memory()  # what the server's timer does
    assert key not in {r.name for r in server.service.list_shared_memory()}


# -- sharded -----------------------------------------------------------------------


def test_one_region_spans_a_sharded_session(shm_servers: list[Live], sid: str) -> None:
    specs = (TensorSpec("big", (40,)), TensorSpec("small", (3,)), TensorSpec("tail", (17,)))
    plan = plan_shards(specs, 2, split_elements=16)
    assert len({p.parent for p in plan.shards[0]} & {p.parent for p in plan.shards[1]}) == 1
    urls = [s.urls["grpc"] for s in shm_servers[1:]]
    sharded = ShardedTransport([connect(u) for u in urls], split_elements=16)
    plain = ShardedTransport([connect(u) for u in urls], split_elements=16)
    try:
        for t, name in ((sharded, sid), (plain, sid + "-wire")):
            t.create_session(SessionSpec(name, "adam", specs, groups=({"lr": 1e-2},),
                                         skip_nonfinite=False))
        region = StepRegion(sharded, [(t.name, t.shape) for t in specs], "FP32")
        assert region.region.key in {r.name for r in sharded.list_shared_memory()}
        places = shard_places(plan, region.params, "FP32")
        assert [p.byte_size for p in places] == [
            4 * sum(p.end - p.start for p in shard) for shard in plan.shards]
        rng = np.random.default_rng(0)
        for step in range(3):
            grads = [WireTensor(t.name, t.shape, "FP32",
                                encode(rng.standard_normal(t.shape), "FP32")) for t in specs]
            want = plain.step(sid + "-wire", grads)
            region.write_gradients(grads)
            got = sharded.step(sid, (), gradients_region=region.gradients,
                               params_region=region.params)
            assert got.step == want.step == step + 1 and got.params == ()
            by_name = {w.name: bytes(w.data) for w in want.params}
            for t in region.parameters():
                assert bytes(t.data) == by_name[t.name], t.name
        region.close(sharded)
        assert sharded.list_shared_memory() == []
    finally:
        sharded.close()
        plain.close()


def test_a_sharded_optimizer_uses_the_region_or_says_why_not(
        shm_servers: list[Live], live: Live, sid: str) -> None:
    urls = [s.urls["grpc"] for s in shm_servers[1:]]
    m, ref_m = model(), model()
    names = [n for n, _ in m.named_parameters()]
    specs = tuple(TensorSpec(n, tuple(p.shape)) for n, p in m.named_parameters())
    with ShardedTransport([connect(u) for u in urls]) as t:  # one-phase steps
        t.create_session(SessionSpec(sid, "adam", specs, groups=({"lr": 1e-2},),
                                     skip_nonfinite=False),
                         [WireTensor(n, tuple(p.shape), "FP32",
                                     encode(p.detach().numpy(), "FP32"))
                          for n, p in m.named_parameters()])
    opt = ac.Adam(m.named_parameters(), lr=1e-2, server=urls, session=sid, shared_memory=True)
    ref = ac.Adam(ref_m.named_parameters(), lr=1e-2, server=live.urls["grpc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_bitwise(train(m, opt, 3), train(ref_m, ref, 3))
    assert opt._session.region is not None and names
    opt.close(delete=True)
    ref.close()
    # the default sharded session checks the whole gradient: its commits carry the
    # parameters, so it goes over the wire, with a warning that says so
    m2 = model()
    exchange = ac.Adam(m2.parameters(), lr=1e-2, server=urls, shared_memory=True)
    with pytest.warns(RuntimeWarning, match="SESSION_SHARDED"):
        train(m2, exchange, 2)
    assert exchange._session.region is None and exchange.describe().step == 2
    exchange.close()


def test_a_shard_on_another_host_makes_the_sharded_session_fall_back(
        shm_servers: list[Live], live: Live, sid: str) -> None:
    # the `live` server refuses (as one on another host would): the other shard must not
    # keep the region either
    urls = [shm_servers[1].urls["grpc"], live.urls["grpc"]]
    with ShardedTransport([connect(u) for u in urls]) as t:
        with pytest.raises(errors.FailedPrecondition):
            StepRegion(t, [("x", (4,))], "FP32")
        assert t.shards[0].list_shared_memory() == []

