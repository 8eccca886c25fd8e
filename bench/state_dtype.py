"""Narrow moments (``state_dtype``): what they save and what they cost, in one run.

    python bench/state_dtype.py                # memory, then both accuracy runs
    python bench/state_dtype.py --only memory

Memory: an Adam session of 16M parameters (a few large tensors and some small ones)
per state dtype, the bytes its moments take and the master plus moments per
parameter as ``describe()`` reports them, beside the bytes the engine really
allocated (tracemalloc, which NumPy reports its buffers to). Targets: int8 moments
<= 2.1 B/param and <= 6.1 with the master; bfloat16 moments <= 4.1.

Accuracy: the digits MLP (AdamW, 200 steps of 64 images) and a tiny GPT-2 built from
a config (2 layers, 128 wide, character-level on the project's own docs, 200 steps),
each trained with float32, bfloat16 and int8 moments on a server this script starts,
and with torch.optim.AdamW and (when importable) torchao's AdamW8bit locally, from
several seeds (data order and initialisation). The held-out loss after training (the
digits the steps never saw; the last tenth of the text), its mean over the seeds and
its difference from the float32-state run of the same seed. Target: within 1%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import start_server

import adamserve_client as ac

ROOT = Path(__file__).resolve().parent.parent
STATE_DTYPES = ("float32", "bfloat16", "int8")


def memory() -> None:
    from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec

    shapes = [(2048, 2048)] * 3 + [(1024, 4096)] + [(1024,)] * 64 + [(4000,)] * 8
    tensors = tuple(TensorSpec(f"t{i}", s) for i, s in enumerate(shapes))
    layout = Layout(tensors)
    n = layout.size
    print(f"Adam session of {n:,} parameters ({len(shapes)} tensors, {64 + 8} of them under "
          "4096 elements)")
    print(f"{'state_dtype':>12} {'moments B/param':>16} {'master+moments':>15} "
          f"{'allocated B/param':>18}")
    for state_dtype in STATE_DTYPES:
        tracemalloc.start()
        opt = FlatOptimizer("adam", layout, state_dtype=state_dtype)
        allocated, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        moments = opt.slot_bytes()
        master = n * opt.dtype.itemsize
        # allocated: param + grad + moments (+ the layout's small tables)
        print(f"{state_dtype:>12} {moments / n:>16.3f} {(master + moments) / n:>15.3f} "
              f"{allocated / n:>18.3f}")
        del opt


# -- accuracy -------------------------------------------------------------------------


# A task: the model to train (from a seed) and the loss of a training step, or with
# step None the evaluation loss (a fixed set the steps never see, or the whole data set).
Task = tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module, int | None], torch.Tensor]]


def digits_task(seed: int) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, held = order[:1500], order[1500:]
    g = torch.Generator().manual_seed(seed)
    batches = [train[torch.randint(0, len(train), (64,), generator=g)] for _ in range(200)]

    def model() -> torch.nn.Module:
        torch.manual_seed(seed)  # 64*128 and 128*128 weights: quantised; biases: float32
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, 10))

    def loss(m: torch.nn.Module, step: int | None) -> torch.Tensor:
        idx = held if step is None else batches[step]
        return torch.nn.functional.cross_entropy(m(x[idx]), y[idx])

    return model, loss


def gpt2_task(seed: int) -> Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    data = torch.tensor(list(text.encode("ascii", "replace")), dtype=torch.long) % 128
    seq, batch = 64, 16
    cut = len(data) * 9 // 10  # the last tenth is held out
    g = torch.Generator().manual_seed(seed)
    starts = [torch.randint(0, cut - seq - 1, (batch,), generator=g) for _ in range(200)]
    held = torch.arange(cut, len(data) - seq - 1, (len(data) - cut) // 64)[:64]
    config = GPT2Config(vocab_size=128, n_positions=seq, n_embd=128, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)

    def model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)

    def loss(m: torch.nn.Module, step: int | None) -> torch.Tensor:
        idx = (held if step is None else starts[step])[:, None] + torch.arange(seq)
        out: Any = m(input_ids=data[idx], labels=data[idx])
        return out.loss  # type: ignore[no-any-return]

    return model, loss


def run(task: Task, make_opt: Callable[[list[torch.nn.Parameter]], Any],
        steps: int = 200) -> float:
    """Train ``steps`` steps; the evaluation loss after them."""
    make_model, loss_of = task
    m = make_model()
    opt = make_opt(list(m.parameters()))
    for step in range(steps):
        opt.zero_grad()
        loss_of(m, step).backward()
        opt.step()
    if hasattr(opt, "close"):
        opt.close()
    with torch.no_grad():
        return float(loss_of(m, None))


def accuracy(url: str, seeds: int) -> None:
    try:
        from torchao.optim import AdamW8bit
    except ImportError as exc:
        AdamW8bit = None
        print(f"(torchao not importable: {exc}; its column is left out)")
    tasks: dict[str, tuple[Callable[[int], Task], float]] = {
        "digits MLP": (digits_task, 1e-3), "tiny GPT-2": (gpt2_task, 1e-3)}
    for name, (make_task, lr) in tasks.items():
        runs: dict[str, Callable[[list[torch.nn.Parameter]], Any]] = {
            f"adamserve {sd}": (lambda ps, sd=sd, lr=lr: ac.AdamW(
                ps, lr=lr, server=url, state_dtype=sd)) for sd in STATE_DTYPES}
        runs["torch.optim.AdamW"] = lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr)
        if AdamW8bit is not None:
            # torchao quantises tensors of 4096 elements or more, as adamserve does
            runs["torchao AdamW8bit"] = lambda ps, lr=lr: AdamW8bit(ps, lr=lr, block_size=256)
        losses = {run_name: [run(make_task(seed), make) for seed in range(seeds)]
                  for run_name, make in runs.items()}
        base = losses["adamserve float32"]
        print(f"\n{name}: held-out loss after 200 steps, mean of {seeds} seeds; and the "
              "largest difference from the float32-state run of the same seed")
        print(f"{'run':>22} {'loss':>10} {'mean diff':>10} {'worst seed':>11}")
        for run_name, values in losses.items():
            diffs = [100 * (v - b) / b for v, b in zip(values, base, strict=True)]
            print(f"{run_name:>22} {np.mean(values):>10.5f} {np.mean(diffs):>9.3f}% "
                  f"{max(diffs, key=abs):>10.3f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("memory", "accuracy"))
    ap.add_argument("--seeds", type=int, default=3, help="accuracy runs per optimizer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.only != "accuracy":
        memory()
    if args.only != "memory":
        with tempfile.TemporaryDirectory() as tmp:
            proc, ports = start_server(Path(tmp))
            try:
                accuracy(f"grpc://127.0.0.1:{ports['grpc']}", args.seeds)
            finally:
                proc.terminate()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
