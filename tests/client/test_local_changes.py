"""Parameters changed locally between steps are the ones the next step starts from.

torch.optim updates the user's tensors in place, so anything that changes them
between steps (model.load_state_dict, a clamp, nn.init, an EMA swap) is what the
next step starts from. The client finds such changes by the tensors' version
counters and sends only those tensors before the step (SetParameters); a step
where nothing changed sends nothing more. Real servers; torch.optim is the oracle.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.transports import SessionInfo, WireTensor, connect
from adamserve_client.transports.grpc import GrpcTransport
from adamserve_client.transports.sharded import ShardedTransport
from tests.client.conftest import Live


class Recording(GrpcTransport):
    """The real gRPC transport, noting which tensors each SetParameters call carried."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sent: list[list[str]] = []

    def set_parameters(self, session_id: str, values: Sequence[WireTensor]) -> SessionInfo:
        self.sent.append([v.name for v in values])
        return super().set_parameters(session_id, values)


def linear(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 2)).to(dtype)


def twin(m: torch.nn.Module) -> torch.nn.Module:
    out = linear(dtype=next(m.parameters()).dtype)
    out.load_state_dict(m.state_dict())
    return out


def backward(m: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    dtype = next(m.parameters()).dtype
    x = torch.randn(8, 3, generator=g, dtype=dtype)
    m(x).pow(2).mean().backward()


def train(m: torch.nn.Module, opt: Any, steps: range, after: Any = None) -> None:
    for step in steps:
        opt.zero_grad()
        backward(m, step)
        opt.step()
        if after is not None:
            after(m, step)


def assert_same(a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol, msg=name)


def test_only_changed_tensors_travel_and_unchanged_steps_send_nothing(
        live: Live, sid: str) -> None:
    transport = Recording(live.urls["grpc"])
    m, ref_m = linear(), linear()
    opt = ac.AdamW(m.named_parameters(), lr=1e-2, server=transport, session=sid)
    ref = torch.optim.AdamW(ref_m.parameters(), lr=1e-2)
    session = live.service.store.get(sid)
    try:
        version = session.version
        for o, mm in ((opt, m), (ref, ref_m)):
            train(mm, o, range(3))
        assert transport.sent == []
        assert session.version == version + 3  # three steps, nothing else changed state
        for mm in (m, ref_m):
            with torch.no_grad():
                mm[2].bias.fill_(0.25)  # one tensor, changed in place
        for o, mm in ((opt, m), (ref, ref_m)):
            train(mm, o, range(3, 5))
        assert transport.sent == [["2.bias"]]
        assert_same(m, ref_m)
    finally:
        opt.close(delete=True)
        transport.close()


def test_views_of_one_storage_are_not_resent(live: Live, sid: str) -> None:
    """Views of one flat buffer share a version counter: writing the step's results
    into one view must not make the others look changed."""
    transport = Recording(live.urls["grpc"])
    flat = torch.zeros(12)
    views = [flat[:8].view(2, 4).requires_grad_(), flat[8:].requires_grad_()]
    opt = ac.Adam(views, lr=1e-2, server=transport, session=sid)
    try:
        for step in range(3):
            for v in views:
                v.grad = torch.full(v.shape, 0.1 * (step + 1))
            opt.step()
        assert transport.sent == []
        with torch.no_grad():
            views[1].fill_(2.0)  # bumps the counter both views share: both are sent
        for v in views:
            v.grad = torch.ones(v.shape)
        opt.step()
        assert transport.sent == [["param.0", "param.1"]]
        opt.step()
        assert len(transport.sent) == 1
    finally:
        opt.close(delete=True)
        transport.close()


def test_a_parameter_given_new_storage(url: str, sid: str) -> None:
    """``p.data = x`` bypasses the version counter but not the storage address."""
    m = linear()
    ref_m = twin(m)
    opt = ac.Adam(m.parameters(), lr=1e-2, server=url, session=sid)
    ref = torch.optim.Adam(ref_m.parameters(), lr=1e-2)

    def halve(mm: torch.nn.Module, step: int) -> None:
        if step == 2:
            mm[2].weight.data = mm[2].weight.detach() * 0.5

    try:
        train(m, opt, range(6), halve)
        train(ref_m, ref, range(6), halve)
        assert_same(m, ref_m, rtol=1e-5)
    finally:
        opt.close(delete=True)


def test_changes_through_data_and_numpy_arrays_are_marked(url: str, sid: str) -> None:
    # p.data.copy_ bypasses the version counter (as it bypasses autograd): say so
    m = torch.nn.Linear(2, 1, bias=False)
    opt = ac.Adam(m.parameters(), lr=0.1, server=url, session=sid)
    try:
        m.weight.data.copy_(torch.full((1, 2), 5.0))
        opt.params_changed([m.weight])
        m(torch.ones(1, 2)).sum().backward()
        opt.step()
        torch.testing.assert_close(m.weight.detach(), torch.full((1, 2), 4.9))
        with pytest.raises(ValueError, match="not parameters of this optimizer"):
            opt.params_changed([torch.zeros(1)])
    finally:
        opt.close(delete=True)
    # NumPy arrays have no version counter at all
    w = np.ones(3)
    nopt = ac.Adam([w], lr=0.1, server=url)
    try:
        w[:] = 5.0
        nopt.params_changed()
        nopt.step([np.ones(3)])
        np.testing.assert_allclose(w, 4.9, rtol=1e-8)  # eps: 5 - 0.1 / (1 + 1e-8)
    finally:
        nopt.close()


def test_a_sharded_session_takes_loaded_weights(shard_servers: list[Live], sid: str) -> None:
    shards = ShardedTransport([connect(s.urls["grpc"]) for s in shard_servers],
                              split_elements=4)  # the 12-element weight is cut in three
    m = linear()
    ref_m = twin(m)
    opt = ac.Adam(m.parameters(), lr=1e-2, server=shards, session=sid)
    ref = torch.optim.Adam(ref_m.parameters(), lr=1e-2)
    try:
        loaded = linear(seed=7).state_dict()
        for o, mm in ((opt, m), (ref, ref_m)):
            train(mm, o, range(2))
            mm.load_state_dict(loaded)
            train(mm, o, range(2, 5))
        assert_same(m, ref_m, rtol=1e-5)
    finally:
        opt.close(delete=True)
        shards.close()


def wait_for_round(live: Live, sid: str) -> None:
    session = live.service.store.get(sid)
    for _ in range(500):
        if session.round is not None:
            return
        threading.Event().wait(0.01)
    raise AssertionError("no round opened")


def test_synchronous_workers_that_all_load_the_same_weights(live: Live, url: str,
                                                            sid: str) -> None:
    """Each worker of a resumed job loads the checkpoint's weights: the first upload
    sets them, the next (equal values, while the round is open) changes nothing."""
    ref_m = linear()
    ref = torch.optim.Adam(ref_m.parameters(), lr=1e-2)
    loaded = linear(seed=3).state_dict()
    models = [linear(), linear()]
    opts = [ac.Adam(mm.parameters(), lr=1e-2, server=url, session=sid, workers=2,
                    worker_id=f"rank{r}", timeout=60) for r, mm in enumerate(models)]
    failures: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            models[rank].load_state_dict(loaded)
            train(models[rank], opts[rank], range(3))  # both ranks use the same batches
        except BaseException as exc:
            failures.append(exc)

    try:
        first = threading.Thread(target=run, args=(0,))
        first.start()
        wait_for_round(live, sid)  # rank 0 uploaded its weights and waits for rank 1
        run(1)
        first.join(60)
        assert not failures, failures
        ref_m.load_state_dict(loaded)
        train(ref_m, ref, range(3))
        for mm in models:
            assert_same(mm, ref_m, rtol=1e-5)
    finally:
        opts[1].close(delete=False)
        opts[0].close(delete=True)


def test_a_round_refuses_other_parameters(live: Live, url: str, sid: str) -> None:
    a, b = linear(), linear()
    opt_a = ac.Adam(a.parameters(), lr=1e-2, server=url, session=sid, workers=2,
                    worker_id="a", timeout=30)
    opt_b = ac.Adam(b.parameters(), lr=1e-2, server=url, session=sid, workers=2,
                    worker_id="b", timeout=30)
    try:
        backward(a, 0)
        pusher = threading.Thread(target=opt_a.step)  # waits for b in the open round
        pusher.start()
        wait_for_round(live, sid)
        before = [p.detach().clone() for p in a.parameters()]
        with torch.no_grad():
            b[0].weight.add_(1.0)
        backward(b, 0)
        with pytest.raises(errors.FailedPrecondition, match="round of pushes for step 1"):
            opt_b.step()
        opt_b.pull()  # b gives up its change, and steps with the others
        backward(b, 0)
        opt_b.step()
        pusher.join(30)
        assert_same(a, b)
        assert not all(torch.equal(x, y) for x, y in zip(before, a.parameters(), strict=True))
    finally:
        opt_b.close(delete=False)
        opt_a.close(delete=True)


def test_master_dtype_follows_the_parameters_unless_asked(url: str, sid: str) -> None:
    """(Parity in float64: test_frameworks.py.) A float64 model gets float64 master
    weights, a float32 one float32; ``master_dtype`` overrides, an attach must agree."""
    m64, m32 = linear(dtype=torch.float64), linear()
    opt = ac.Adam(m64.parameters(), server=url, session=sid)
    try:
        assert opt.describe().dtype == "float64"
        with pytest.raises(ValueError, match="keeps float64 master weights; this optimizer "
                           "asks for master_dtype 'float32'"):
            ac.Adam(m64.parameters(), server=url, session=sid, master_dtype="float32")
    finally:
        opt.close(delete=True)
    for params, asked, want in ((m64.parameters(), "float32", "float32"),
                                (m32.parameters(), None, "float32"),
                                (m32.parameters(), "float64", "float64")):
        o = ac.Adam(params, server=url, master_dtype=asked)
        try:
            assert o.describe().dtype == want
        finally:
            o.close()
    with pytest.raises(ValueError, match="master_dtype 'float16': expected 'float32' or"):
        ac.Adam(m32.parameters(), server="grpc://127.0.0.1:9", master_dtype="float16")


def test_opt_state_reads_the_servers_state(url: str, sid: str) -> None:
    m = linear()
    ref_m = twin(m)
    opt = ac.Adam(m.parameters(), lr=1e-2, amsgrad=True, server=url, session=sid)
    ref = torch.optim.Adam(ref_m.parameters(), lr=1e-2, amsgrad=True)
    try:
        assert len(opt.state) == 0 and opt.state[m[0].weight] == {}
        for step in range(3):
            train(m, opt, range(step, step + 1))
            train(ref_m, ref, range(step, step + 1))
            for p, q in zip(m.parameters(), ref_m.parameters(), strict=True):
                mine, theirs = opt.state[p], ref.state[q]
                assert list(mine) == list(theirs)
                for slot in theirs:
                    torch.testing.assert_close(mine[slot], theirs[slot], rtol=1e-5, atol=1e-7)
        assert len(opt.state) == 4 and list(opt.state) == list(m.parameters())
        assert m[0].weight in opt.state and torch.zeros(1) not in opt.state
        with pytest.raises(KeyError):
            opt.state[torch.zeros(1)]
    finally:
        opt.close(delete=True)


def test_describe_shows_hyperparameters_changed_since_the_last_step(
        url: str, sid: str) -> None:
    m = linear()
    opt = ac.AdamW(m.parameters(), lr=1e-2, server=url, session=sid)
    try:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        train(m, opt, range(1))
        sched.step()
        assert opt.describe().lr == (5e-3,)
    finally:
        opt.close(delete=True)


def test_a_missing_wire_library_names_the_extra() -> None:
    code = ("import sys; sys.modules['httpx'] = None\n"
            "import adamserve_client as ac\n"
            "try:\n"
            "    ac.transports.connect('http://127.0.0.1:9')\n"
            "except ImportError as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == ("ImportError adamserve_client: http:// URLs need the httpx package, which "
                   "is not installed: pip install 'adamserve[client]'")
