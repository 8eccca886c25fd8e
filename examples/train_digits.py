"""Train a small MLP on scikit-learn's digits twice: with adamserve and with torch.optim.

    python examples/train_digits.py --steps 300

Uses the server ``--server URL`` (or ``$ADAMSERVE_URL``) names; with neither, starts
one of its own (``python -m adamserve.cli serve`` on free ports, no data directory)
and stops it at the end. Then trains the same network from the same initial weights
on the same mini-batches with

* ``adamserve_client.AdamW`` (state and update on the server) and
* local ``torch.optim.AdamW``,

each under torch's ``CosineAnnealingLR``, and prints both loss curves and their
largest relative difference. The only change to the training loop is the
optimizer's constructor. ``--check TOL`` exits with status 1 when the curves
differ by more than TOL (relative).

The digits data set (1,797 8x8 images) ships inside scikit-learn: nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from _server import SERVER_HELP, given_url, server_or_own
from sklearn.datasets import load_digits

import adamserve_client


def data() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x, torch.tensor(digits.target, dtype=torch.long)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor, batches: list[torch.Tensor]) -> list[float]:
    """The usual loop; returns the loss of every step."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(batches))
    losses = []
    for idx in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Starts a server of its own unless --server or $ADAMSERVE_URL names one.")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server", metavar="URL", help=SERVER_HELP)
    ap.add_argument("--transport", choices=("grpc", "http"), default="grpc",
                    help="which transport of the server it starts to use (not with --server)")
    ap.add_argument("--check", type=float, metavar="TOL",
                    help="exit 1 when the curves differ by more than TOL (relative)")
    args = ap.parse_args(argv)

    x, y = data()
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, len(x), (args.batch_size,), generator=g)
               for _ in range(args.steps)]

    with server_or_own(args.server, args.transport) as url:
        print(f"adamserve at {url} ({'given' if given_url(args.server) else 'started here'})")
        t0 = time.perf_counter()
        remote = adamserve_client.AdamW(model.parameters(), lr=args.lr, server=url)
        with remote:
            remote_losses = train(model, remote, x, y, batches)
        t_remote = time.perf_counter() - t0
    t0 = time.perf_counter()
    local_losses = train(twin, torch.optim.AdamW(twin.parameters(), lr=args.lr), x, y, batches)
    t_local = time.perf_counter() - t0

    worst = max(abs(a - b) / abs(b) for a, b in zip(remote_losses, local_losses, strict=True))
    every = max(1, args.steps // 20)
    print(f"{'step':>6} {'adamserve':>12} {'torch.optim':>12} {'rel. diff':>10}")
    for i in range(0, args.steps, every):
        a, b = remote_losses[i], local_losses[i]
        print(f"{i + 1:>6} {a:>12.6f} {b:>12.6f} {abs(a - b) / abs(b):>10.2e}")
    print(f"steps: {args.steps}; time: adamserve {t_remote:.2f} s, torch.optim {t_local:.2f} s")
    print(f"largest relative difference: {worst:.3e}")
    if args.check is not None and not worst <= args.check:
        print(f"FAIL: above {args.check:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
