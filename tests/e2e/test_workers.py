"""Many worker processes on one session of a real server, and a sharded session whose
shard is killed with SIGKILL mid-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adamserve_client as ac

from . import data_parallel_worker as worker
from .conftest import ServerProcess

STEPS = 12


@pytest.mark.parametrize("transport,world", [("grpc", 4), ("http", 2)])
def test_sync_workers_equal_one_process_on_the_concatenated_batch(
        tmp_path: Path, server_factory: type[ServerProcess], transport: str,
        world: int) -> None:
    server = server_factory(tmp_path / "data").start()
    url = (f"grpc://{server.grpc_target}" if transport == "grpc" else server.http_url)
    procs = [subprocess.Popen(
        [sys.executable, worker.__file__, url, "dp", str(rank), str(world), str(STEPS),
         str(tmp_path / f"rank{rank}.npz")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]

    net = worker.model()
    local = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        x, y = worker.global_batch(step, world)
        local.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        local.step()
    expected = [p.detach().numpy() for p in net.parameters()]
    for rank in range(world):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for i, want in enumerate(expected):
            np.testing.assert_allclose(got[f"arr_{i}"], want, rtol=2e-5, atol=2e-6)


def _grads(step: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    rng = np.random.default_rng(step)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def test_a_shard_killed_mid_run_resumes_from_the_consistent_checkpoint(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    """Three shard servers checkpoint every 3 steps. After step 7 one is killed with
    SIGKILL and restarted; the job (a new optimizer, as a restarted job would make)
    finds the shards at different steps, restores the newest step every shard holds
    and trains on from there: the result equals an uninterrupted run on one server."""
    shapes = [(30, 20), (20,), (64,), (5, 5)]
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    shards = [server_factory(tmp_path / f"shard{i}", "--checkpoint-every", "3").start()
              for i in range(3)]

    def urls() -> list[str]:
        return [f"grpc://{s.grpc_target}" for s in shards]

    def optimizer(params: list[np.ndarray]) -> ac.AdamW:
        # split_elements 64: the 600-element weight is cut between shards
        sharded = ac.ShardedTransport([ac.connect(u, timeout=30) for u in urls()],
                                      split_elements=64)
        return ac.AdamW(params, lr=1e-2, server=sharded, session="job")

    params = [p.copy() for p in init]
    opt = optimizer(params)
    for step in range(7):
        opt.step(_grads(step, shapes))
    opt.transport.close()
    shards[1].kill()
    shards[1] = server_factory(tmp_path / "shard1", "--checkpoint-every", "3").start()

    params = [p.copy() for p in init]
    opt = optimizer(params)
    assert opt.transport.describe("job").step == 6  # the restarted shard's checkpoint
    assert opt.transport.list_checkpoints("job") == [3, 6]
    resumed = opt.restore_checkpoint()
    assert resumed == 6 and opt.describe().step == 6
    for step in range(resumed, 10):
        opt.step(_grads(step, shapes))
    assert opt.describe().step == 10
    opt.transport.close()

    one = server_factory(tmp_path / "one").start()
    ref = [p.copy() for p in init]
    single = ac.AdamW(ref, lr=1e-2, server=f"grpc://{one.grpc_target}")
    for step in range(10):
        single.step(_grads(step, shapes))
    for got, want in zip(params, ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    single.close()
