"""Train with a server-side warmup-cosine schedule; restart the server mid-run; resume.

    python examples/resume_after_restart.py --steps 200

The learning-rate schedule lives on the server (``schedule=...``: linear warmup,
then cosine decay, computed from the session's step count), so the training loop
has no scheduler at all. It starts a server of its own (``python -m adamserve.cli
serve`` on free ports, a temporary data directory); halfway through, that server
is stopped (SIGTERM: it checkpoints every session to its data directory) and
started again; a fresh optimizer attaches to the session by name, pulls the
parameters back into a freshly initialised model and carries on. The loss curve is
compared with an uninterrupted run of the same training: they agree to float32
rounding.

With ``--server URL`` (or ``$ADAMSERVE_URL``) it uses that server instead and
cannot restart it: halfway through, the training process's side restarts (a fresh
model and optimizer attach to the session by name), the server keeps running. Its
sessions get fresh names and are deleted at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from _server import SERVER_HELP, adamserve_server, given_url
from sklearn.datasets import load_digits

import adamserve_client


def warmup_cosine(warmup: int, total: int) -> dict[str, object]:
    return {"kind": "join", "milestones": [warmup], "schedules": [
        {"kind": "linear", "start_factor": 0.0, "end_factor": 1.0, "total_steps": warmup},
        {"kind": "cosine", "total_steps": total - warmup, "eta_min": 0.0}]}


def new_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def run(url: str, session: str, model: torch.nn.Module, steps: range, schedule: dict[str, object],
        x: torch.Tensor, y: torch.Tensor, *, last: bool = False) -> list[float]:
    """Train ``steps`` (global step numbers, for the mini-batches) on session ``session``;
    ``last``: delete the session afterwards (it is done with)."""
    losses = []
    opt = adamserve_client.AdamW(model.named_parameters(), lr=5e-3, server=url, session=session,
                                 schedule=schedule)
    try:
        for step in steps:
            idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        opt.close(delete=last)  # a named session outlives its optimizer unless told
    return losses


def server(given: str | None, transport: str, data_dir: Path) -> AbstractContextManager[str]:
    """The given server (kept running), or a server of our own on ``data_dir``."""
    return nullcontext(given) if given else adamserve_server(transport, data_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Starts (and restarts) a server of its own unless --server or $ADAMSERVE_URL "
        "names one; a server it did not start is not restarted.")
    ap.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    ap.add_argument("--server", metavar="URL", help=SERVER_HELP)
    ap.add_argument("--transport", choices=("grpc", "http"), default="grpc",
                    help="which transport of the server it starts to use (not with --server)")
    ap.add_argument("--check", type=float, metavar="TOL",
                    help="exit 1 when the curves differ by more than TOL (relative)")
    args = ap.parse_args(argv)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    schedule = warmup_cosine(max(1, args.steps // 10), args.steps)
    half = args.steps // 2
    given = given_url(args.server)
    # fresh names: a given server may hold sessions of earlier runs (or of others)
    name = f"digits-{uuid.uuid4().hex[:8]}"

    with tempfile.TemporaryDirectory(prefix="adamserve-resume-") as tmp:
        data_dir = Path(tmp) / "data"
        torch.manual_seed(0)
        model = new_model()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        with server(given, args.transport, data_dir) as url:
            print(f"{'given' if given else 'first'} server at {url}: steps 1-{half}")
            curve = run(url, name, model, range(half), schedule, x, y)
        # a server started here is gone; its data directory holds the session's checkpoint
        with server(given, args.transport, data_dir) as url:
            which = "the same server (not started here, so not restarted)" if given else \
                "restarted server"
            print(f"{which} at {url}: steps {half + 1}-{args.steps}")
            resumed = new_model()  # fresh weights: attaching pulls the server's
            curve += run(url, name, resumed, range(half, args.steps), schedule, x, y, last=True)
            # the same training without the restart, for comparison
            straight = new_model()
            straight.load_state_dict(start)
            reference = run(url, f"{name}-straight", straight, range(args.steps), schedule, x, y,
                            last=True)

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
