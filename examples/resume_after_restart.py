"""Train with a server-side warmup-cosine schedule; restart the server mid-run; resume.

    python examples/resume_after_restart.py --steps 200

The learning-rate schedule lives on the server (``schedule=...``: linear warmup,
then cosine decay, computed from the session's step count), so the training loop
has no scheduler at all. Halfway through, the server is stopped (SIGTERM: it
checkpoints every session to its data directory) and started again; a fresh
optimizer attaches to the session by name, pulls the parameters back into a
freshly initialised model and carries on. The loss curve is compared with an
uninterrupted run of the same training: they agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _server import adamserve_server
from sklearn.datasets import load_digits

import adamserve_client


def warmup_cosine(warmup: int, total: int) -> dict[str, object]:
    return {"kind": "join", "milestones": [warmup], "schedules": [
        {"kind": "linear", "start_factor": 0.0, "end_factor": 1.0, "total_steps": warmup},
        {"kind": "cosine", "total_steps": total - warmup, "eta_min": 0.0}]}


def new_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def run(url: str, session: str, model: torch.nn.Module, steps: range, schedule: dict[str, object],
        x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Train ``steps`` (global step numbers, for the mini-batches) on session ``session``."""
    losses = []
    with adamserve_client.AdamW(model.named_parameters(), lr=5e-3, server=url, session=session,
                                schedule=schedule) as opt:
        for step in steps:
            idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--transport", choices=("grpc", "http"), default="grpc")
    ap.add_argument("--check", type=float, metavar="TOL",
                    help="exit 1 when the curves differ by more than TOL (relative)")
    args = ap.parse_args(argv)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    schedule = warmup_cosine(max(1, args.steps // 10), args.steps)
    half = args.steps // 2

    with tempfile.TemporaryDirectory(prefix="adamserve-resume-") as tmp:
        data_dir = Path(tmp) / "data"
        torch.manual_seed(0)
        model = new_model()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        with adamserve_server(args.transport, data_dir) as url:
            print(f"first server at {url}: steps 1-{half}")
            curve = run(url, "digits", model, range(half), schedule, x, y)
        # the server is gone; its data directory holds the session's checkpoint
        with adamserve_server(args.transport, data_dir) as url:
            print(f"restarted server at {url}: steps {half + 1}-{args.steps}")
            resumed = new_model()  # fresh weights: attaching pulls the server's
            curve += run(url, "digits", resumed, range(half, args.steps), schedule, x, y)
            # the same training without the restart, for comparison
            straight = new_model()
            straight.load_state_dict(start)
            reference = run(url, "digits-straight", straight, range(args.steps), schedule, x, y)

    worst = max(abs(a - b) / abs(b) for a, b in zip(curve, reference, strict=True))
    every = max(1, args.steps // 10)
    print(f"{'step':>6} {'restarted':>12} {'straight':>12}")
    for i in range(0, args.steps, every):
        print(f"{i + 1:>6} {curve[i]:>12.6f} {reference[i]:>12.6f}")
    print(f"largest relative difference: {worst:.3e}")
    if args.check is not None and not worst <= args.check:
        print(f"FAIL: above {args.check:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
