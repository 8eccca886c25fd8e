"""One data-parallel worker, run as its own process by test_workers.py.

Trains a small torch model on its slice of each global batch with
``adamserve_client.AdamW(..., workers=K)``: every step is the mean of the K
workers' gradients, so K of these together train like one process on the whole
batch. Writes its final parameters to ``--out`` (NumPy .npz).

    python data_parallel_worker.py URL SESSION RANK WORLD STEPS OUT
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import adamserve_client as ac

BATCH = 8  # rows per worker per step
FEATURES, OUTPUTS = 6, 3


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, OUTPUTS))


def global_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * BATCH, FEATURES, generator=g)
    y = torch.randn(world * BATCH, OUTPUTS, generator=g)
    return x, y


def main(url: str, session: str, rank: int, world: int, steps: int, out: str) -> None:
    net = model()
    opt = ac.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, server=url, session=session,
                   workers=world, worker_id=f"rank{rank}", timeout=60)
    for step in range(steps):
        x, y = global_batch(step, world)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x[rows]), y[rows]).backward()
        opt.step()
        assert opt.last_step is not None and opt.last_step.contributors == world
    np.savez(out, *[p.detach().numpy() for p in net.parameters()])
    opt.close()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5])
