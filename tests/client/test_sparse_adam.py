"""SparseAdam (and Adagrad, the other optimizer torch steps from sparse gradients)
through the client, against torch.optim 2.13.

Sparse gradients (``torch.sparse_coo_tensor``, as ``nn.Embedding(sparse=True)`` makes
them) go row-sparse, and only the rows sent come back: a table of cases trained 30
steps on every transport against torch locally, float32 and float64, two parameter
groups and a torch LR scheduler, some steps touching no row and some repeating
indices (torch coalesces them). Then the state_dicts both ways, an embedding model of
100,000 rows with a dense head, a sharded session, and the refusals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve_client import errors
from adamserve_client.transports import WireTensor
from tests.client.test_muon import groups, schedule

STEPS = 30
SHAPES = [(50, 4), (30, 3), (20,)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}

CASES = {
    "defaults": ({}, {"lr": 5e-3}),
    "tuned": ({"lr": 2e-2, "betas": (0.8, 0.99), "eps": 1e-6},
              {"betas": (0.5, 0.9), "maximize": True}),
}


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def make_grads(step: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Sparse gradients: a few rows each (repeated indices summed, as torch does), none
    at all every fifth step for the first tensor, no gradient every third for the last."""
    g = torch.Generator().manual_seed(1000 + step)
    out: list[torch.Tensor | None] = []
    for k, shape in enumerate(SHAPES):
        count = 0 if (k == 0 and step % 5 == 4) else 6
        idx = torch.randint(0, shape[0], (count,), generator=g)
        values = torch.randn((count, *shape[1:]), generator=g, dtype=dtype)
        out.append(torch.sparse_coo_tensor(idx[None], values, shape))
    if step % 3 == 2:
        out[2] = None
    return out


def step_both(pairs: list[tuple[list[torch.Tensor], Any]], step: int,
              dtype: torch.dtype) -> None:
    for params, opt in pairs:
        for p, g in zip(params, make_grads(step, dtype), strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


def close(ours: list[torch.Tensor], theirs: list[torch.Tensor], tol: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), rtol=tol,
                                   atol=tol, err_msg=f"tensor {i} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch(url: str, sid: str, case: str, dtype: torch.dtype) -> None:
    options, group2 = CASES[case]
    remote_params, local_params = make_params(dtype), make_params(dtype)
    opt = ac.SparseAdam(groups(remote_params, group2), server=url, session=sid, **options)
    ref = torch.optim.SparseAdam(groups(local_params, group2), **options)
    scheds = [schedule(opt), schedule(ref)]
    try:
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
            {k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
        for step in range(STEPS):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
            for s in scheds:
                s.step()
            close(remote_params, local_params, TOL[dtype], f"after step {step + 1}")
        assert opt.last_step is not None and opt.last_step.step == STEPS
    finally:
        opt.close(delete=True)


def test_state_dict_both_ways(url: str, sid: str) -> None:
    dtype = torch.float64
    options, group2 = CASES["tuned"]
    remote_params, local_params = make_params(dtype, 3), make_params(dtype, 3)
    opt = ac.SparseAdam(groups(remote_params, group2), server=url, session=sid, **options)
    ref = torch.optim.SparseAdam(groups(local_params, group2), **options)
    try:
        for step in range(8):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        mine, theirs_sd = opt.state_dict(), ref.state_dict()
        assert set(mine["state"]) == set(theirs_sd["state"])
        for i, entry in theirs_sd["state"].items():
            assert set(mine["state"][i]) == set(entry)
            assert int(mine["state"][i]["step"]) == int(entry["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                np.testing.assert_allclose(mine["state"][i][key].numpy(), entry[key].numpy(),
                                           rtol=1e-12, atol=1e-14)
        theirs_params = [p.detach().clone() for p in remote_params]
        theirs = torch.optim.SparseAdam(groups(theirs_params, {}))
        theirs.load_state_dict(mine)
        ours_params = [p.detach().clone() for p in local_params]
        ours = ac.SparseAdam(groups(ours_params, {}), server=url, session=f"{sid}-loaded")
        try:
            ours.load_state_dict(theirs_sd)
            for step in range(8, 16):
                step_both([(remote_params, opt), (local_params, ref),
                           (theirs_params, theirs), (ours_params, ours)], step, dtype)
            close(theirs_params, local_params, 1e-12, "torch, from our state_dict")
            close(ours_params, local_params, 1e-12, "ours, from torch's state_dict")
        finally:
            ours.close(delete=True)
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_adagrad_steps_sparse_gradients_as_torch(url: str, sid: str, dtype: torch.dtype) -> None:
    remote_params, local_params = make_params(dtype, 4), make_params(dtype, 4)
    opt = ac.Adagrad(remote_params, lr=0.1, lr_decay=0.01, server=url, session=sid)
    ref = torch.optim.Adagrad(local_params, lr=0.1, lr_decay=0.01)
    try:
        for step in range(12):
            step_both([(remote_params, opt), (local_params, ref)], step, dtype)
        close(remote_params, local_params, TOL[dtype], "after 12 steps")
    finally:
        opt.close(delete=True)


class _Model(torch.nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(rows, dim, sparse=True)
        self.head = torch.nn.Linear(dim, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.emb(idx).mean(dim=1)).squeeze(-1)
        return out


@pytest.mark.parametrize("url", ["grpc", "flight"], indirect=True)
def test_an_embedding_model_trains_as_with_torch(url: str, sid: str) -> None:
    """nn.Embedding(100_000, 64, sparse=True) and a dense head: SparseAdam for the
    table and Adam for the head, as torch's users pair them; the same losses and
    weights as torch's pair, each step returning only the rows the batch touched."""
    torch.manual_seed(0)
    remote, local = _Model(100_000, 64), _Model(100_000, 64)
    local.load_state_dict(remote.state_dict())
    sparse = ac.SparseAdam(remote.emb.parameters(), lr=1e-2, server=url, session=sid)
    dense = ac.Adam(remote.head.parameters(), lr=1e-2, server=url, session=sid + "-head")
    refs = [torch.optim.SparseAdam(local.emb.parameters(), lr=1e-2),
            torch.optim.Adam(local.head.parameters(), lr=1e-2)]
    g = torch.Generator().manual_seed(7)
    try:
        for _ in range(6):
            idx = torch.randint(0, 100_000, (32, 5), generator=g)
            target = torch.randn(32, generator=g)
            losses = []
            for model, opts in ((remote, (sparse, dense)), (local, refs)):
                for o in opts:
                    o.zero_grad()
                loss = torch.nn.functional.mse_loss(model(idx), target)
                loss.backward()
                for o in opts:
                    o.step()
                losses.append(float(loss))
            assert losses[0] == pytest.approx(losses[1], rel=1e-6)
            assert sparse.last_step is not None
        np.testing.assert_allclose(remote.emb.weight.detach().numpy(),
                                   local.emb.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(remote.head.weight.detach().numpy(),
                                   local.head.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    finally:
        sparse.close(delete=True)
        dense.close(delete=True)


@pytest.mark.parametrize("wire", ["grpc", "http"])
def test_a_sharded_session_steps_the_rows_each_shard_holds(shard_servers: list[Any],
                                                           wire: str) -> None:
    dtype = torch.float64
    transport = ac.ShardedTransport([ac.connect(s.urls[wire]) for s in shard_servers],
                                    split_elements=8)
    remote_params, local_params = make_params(dtype, 5), make_params(dtype, 5)
    opt = ac.SparseAdam(groups(remote_params, {"lr": 3e-3}), lr=1e-2, server=transport)
    ref = torch.optim.SparseAdam(groups(local_params, {"lr": 3e-3}), lr=1e-2)
    try:
        for step in range(0, 16, 3):  # every tensor has a gradient (as sharded sessions need)
            step_both([(remote_params, opt), (local_params, ref)], step + 1, dtype)
        close(remote_params, local_params, 1e-12, "after 6 steps")
    finally:
        opt.close(delete=True)
        transport.close()


# -- refusals ------------------------------------------------------------------------------


def test_a_dense_gradient_is_torchs_error(url: str, sid: str) -> None:
    p = torch.zeros(4, 2)
    opt = ac.SparseAdam([p], server=url, session=sid)
    ref = torch.optim.SparseAdam([torch.zeros(4, 2)])
    try:
        p.grad = torch.ones(4, 2)
        ref.param_groups[0]["params"][0].grad = torch.ones(4, 2)
        with pytest.raises(RuntimeError) as expected:
            ref.step()
        with pytest.raises(RuntimeError) as raised:
            opt.step()
        assert str(raised.value) == str(expected.value)
        assert opt.describe().step == 0
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"eps": 0.0}, {"betas": (1.0, 0.9)},
                                    {"betas": (0.9, -0.1)}], ids=["lr", "eps", "beta1", "beta2"])
def test_constructor_errors_are_torchs(live: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as expected:
        torch.optim.SparseAdam([torch.zeros(2, 2)], **kwargs)
    with pytest.raises(ValueError) as raised:
        ac.SparseAdam([torch.zeros(2, 2)], server=live.urls["grpc"], **kwargs)
    assert str(raised.value) == str(expected.value)


def test_adagrad_with_weight_decay_refuses_sparse_gradients_as_torch(url: str,
                                                                    sid: str) -> None:
    emb = torch.nn.Embedding(6, 2, sparse=True)
    opt = ac.Adagrad(emb.parameters(), weight_decay=0.1, server=url, session=sid)
    ref = torch.optim.Adagrad(emb.parameters(), weight_decay=0.1)
    try:
        emb(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError) as expected:
            ref.step()
        with pytest.raises(RuntimeError) as raised:
            opt.step()
        assert str(raised.value) == str(expected.value)
        assert opt.describe().step == 0
    finally:
        opt.close(delete=True)


def test_a_row_sparse_gradient_for_muon_is_refused(live: Any, sid: str) -> None:
    with ac.connect(live.urls["grpc"]) as t:
        t.create_session(ac.transports.SessionSpec(
            sid, "muon", (ac.transports.TensorSpec("w", (4, 3)),)))
        rows = np.array([1], "<i8").tobytes()
        with pytest.raises(errors.InvalidArgument, match="Muon orthogonalises"):
            t.step(sid, [WireTensor("w", (4, 3), "FP32", np.ones(3, "<f4").tobytes(), rows)])
        assert t.describe(sid).step == 0


def test_an_element_sparse_gradient_is_refused_not_rounded_to_rows(url: str, sid: str) -> None:
    """torch's SparseAdam is lazy per element; the server steps whole rows: a gradient
    sparse in both dims is refused (nothing sent), not widened to its rows."""
    p = torch.zeros(4, 3)
    opt = ac.SparseAdam([p], server=url, session=sid)
    try:
        p.grad = torch.sparse_coo_tensor([[1], [0]], [1.0], (4, 3))
        with pytest.raises(ValueError, match="sparse in 2 dims"):
            opt.step()
        assert opt.describe().step == 0
    finally:
        opt.close(delete=True)
