"""Parameters changed locally after the optimizer is built, and the training frameworks
that do so, against a real server over both transports, compared with torch.optim.

The server keeps the master weights. Whatever writes the parameters outside
``step()`` — ``model.load_state_dict``, an in-place ``clamp_`` under no_grad,
``nn.init``, an EMA swap, a framework resuming from a checkpoint (HF Trainer,
accelerate) — must be what the next step starts from, as with torch.optim.

Each scenario is one function taking an optimizer factory; it runs once with
``torch.optim`` and once with ``adamserve_client`` and the trajectories are
compared. ``ADAMSERVE_FRAMEWORKS_SELF_CHECK=1`` runs the scenarios with torch.optim
in place of the client as well: the reference logic itself must then pass.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import adamserve_client as ac

# the HF tests build their tiny models from configs: never reach the Hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SELF_CHECK = os.environ.get("ADAMSERVE_FRAMEWORKS_SELF_CHECK") == "1"

Factory = Callable[..., torch.optim.Optimizer]
Snapshot = list[np.ndarray]


def factory(name: str, url: str | None = None, session: str | None = None) -> Factory:
    """``torch.optim.<name>`` (url None), else ``adamserve_client.<name>`` on ``url``."""
    if url is None or SELF_CHECK:
        return getattr(torch.optim, name)  # type: ignore[no-any-return]
    cls = getattr(ac, name)

    def make(params: Any, **kw: Any) -> torch.optim.Optimizer:
        return cls(params, server=url, session=session, **kw)  # type: ignore[no-any-return]

    return make


def close(opt: Any) -> None:
    opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps ours
    if isinstance(opt, ac.RemoteOptimizer):
        opt.close(delete=True)


@pytest.fixture
def opts() -> Iterator[list[Any]]:
    """Optimizers a test builds: closed (their sessions deleted) at the end."""
    made: list[Any] = []
    yield made
    for opt in made:
        close(opt)


def snapshot(params: Any) -> Snapshot:
    return [p.detach().double().numpy().copy() for p in params]


def assert_trajectory(got: list[Snapshot], want: list[Snapshot], rtol: float, atol: float,
                      what: str = "step") -> None:
    """Same length, and every snapshot close; the message names the first one that is not
    and by how much."""
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            where = f"after {what} {k + 1}" if len(got) > 1 else what
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                       err_msg=f"tensor {i}: {where}")


def mlp(seed: int, sizes: tuple[int, ...] = (4, 8, 1)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def batch(step: int, n: int = 16, dim: int = 4, dtype: torch.dtype = torch.float32
          ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True).sin()
    return x.to(dtype), y.to(dtype)


# -- plain torch: writes to the parameters outside step() -------------------------------


def load_weights_after_build(make: Factory, opts: list[Any]) -> list[Snapshot]:
    torch.manual_seed(0)
    m = nn.Linear(2, 1)
    opt = make(m.parameters(), lr=0.1)
    opts.append(opt)
    m.load_state_dict({"weight": torch.full((1, 2), 5.0), "bias": torch.full((1,), -1.0)})
    out = []
    for step in range(3):
        opt.zero_grad()
        m(torch.ones(3, 2) * (step + 1)).sum().backward()
        opt.step()
        out.append(snapshot(m.parameters()))
    return out


def test_load_state_dict_after_build(url: str, sid: str, opts: list[Any]) -> None:
    want = load_weights_after_build(factory("Adam"), opts)
    np.testing.assert_allclose(want[0][0], [[4.9, 4.9]], rtol=1e-6)  # Adam's first step: lr
    np.testing.assert_allclose(want[0][1], [-1.1], rtol=1e-6)
    got = load_weights_after_build(factory("Adam", url, sid), opts)
    assert_trajectory(got, want, rtol=1e-6, atol=1e-7)


CLAMP = 0.05


def clamped_critic(make: Factory, opts: list[Any], steps: int = 20) -> list[Snapshot]:
    """WGAN's critic: RMSprop, weights clipped to [-c, c] after every step."""
    critic = mlp(1)
    opt = make(critic.parameters(), lr=1e-2)
    opts.append(opt)
    out = []
    for step in range(steps):
        real, fake = batch(step)[0], 0.5 * batch(1000 + step)[0] + 1.0
        opt.zero_grad()
        (critic(fake).mean() - critic(real).mean()).backward()
        opt.step()
        with torch.no_grad():
            for p in critic.parameters():
                p.clamp_(-CLAMP, CLAMP)
        out.append(snapshot(critic.parameters()))
    return out


def test_clamp_after_every_step(url: str, sid: str, opts: list[Any]) -> None:
    want = clamped_critic(factory("RMSprop"), opts)
    # the clip is active: most weights sit on its bounds, yet not all
    on_bound = np.mean([np.isclose(np.abs(w), CLAMP).mean() for w in want[-1]])
    assert 0.2 < on_bound < 1.0
    got = clamped_critic(factory("RMSprop", url, sid), opts)
    assert_trajectory(got, want, rtol=1e-5, atol=1e-6)


def ema_training(make: Factory, opts: list[Any], adopt: bool, steps: int = 20
                 ) -> tuple[list[Snapshot], list[float]]:
    """AdamW with an EMA of the weights. Every 5 steps the EMA weights are swapped in
    for an evaluation and swapped back out (in-place copies under no_grad); with
    ``adopt``, after step 10 training goes on from the EMA weights."""
    model = mlp(2)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = make(model.parameters(), lr=3e-2)
    opts.append(opt)
    out, evals = [], []
    held_out = batch(-1)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters(), strict=True):
                e.lerp_(p, 0.2)
        if (step + 1) % 5 == 0:
            with torch.no_grad():
                stash = [p.detach().clone() for p in model.parameters()]
                for p, e in zip(model.parameters(), ema, strict=True):
                    p.copy_(e)
                evals.append(nn.functional.mse_loss(model(held_out[0]), held_out[1]).item())
                if not (adopt and step + 1 == 10):
                    for p, s in zip(model.parameters(), stash, strict=True):
                        p.copy_(s)
        out.append(snapshot(model.parameters()))
    return out, evals


@pytest.mark.parametrize("adopt", [False, True], ids=["swap-back", "adopt-ema"])
def test_ema_swap(url: str, sid: str, opts: list[Any], adopt: bool) -> None:
    want, want_evals = ema_training(factory("AdamW"), opts, adopt)
    got, got_evals = ema_training(factory("AdamW", url, sid), opts, adopt)
    assert_trajectory(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_evals, want_evals, rtol=1e-5)


def reinitialised(make: Factory, opts: list[Any], steps: int = 10) -> list[Snapshot]:
    model = mlp(3, (4, 6, 6, 1))
    opt = make(model.parameters(), lr=1e-2)
    opts.append(opt)
    torch.manual_seed(33)
    first, second, head = model[0], model[2], model[4]
    nn.init.orthogonal_(first.weight)
    nn.init.kaiming_uniform_(second.weight, a=0.1)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(first.bias)
    nn.init.constant_(second.bias, 0.25)
    nn.init.normal_(head.bias, std=0.5)
    out = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        out.append(snapshot(model.parameters()))
    return out


def test_nn_init_after_build(url: str, sid: str, opts: list[Any]) -> None:
    want = reinitialised(factory("Adam"), opts)
    got = reinitialised(factory("Adam", url, sid), opts)
    assert_trajectory(got, want, rtol=1e-5, atol=1e-6)


def float64_training(make: Factory, opts: list[Any], steps: int = 10
                     ) -> tuple[list[Snapshot], dict[str, Any]]:
    model = mlp(4).double()
    opt = make(model.parameters())
    opts.append(opt)
    out = []
    for step in range(steps):
        x, y = batch(step, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        out.append(snapshot(model.parameters()))
        assert all(p.dtype == torch.float64 for p in model.parameters())
    return out, opt.state_dict()


def test_float64_model_is_optimized_in_float64(url: str, sid: str, opts: list[Any]) -> None:
    """Default arguments: the master weights and the state follow the parameters' dtype."""
    want, want_sd = float64_training(factory("AdamW"), opts)
    got, got_sd = float64_training(factory("AdamW", url, sid), opts)
    assert_trajectory(got, want, rtol=1e-12, atol=1e-15)
    assert got_sd["state"].keys() == want_sd["state"].keys()
    for k, entry in want_sd["state"].items():
        assert list(got_sd["state"][k]) == list(entry)
        for slot, value in entry.items():
            mine = got_sd["state"][k][slot]
            assert mine.dtype == value.dtype, (k, slot, mine.dtype, value.dtype)
            np.testing.assert_allclose(mine.numpy(), value.numpy(), rtol=1e-10, atol=1e-15,
                                       err_msg=f"state {k} {slot}")


# -- transformers.Trainer: save at step 20, resume in a new process's worth of objects ---

SAVE_AT, TOTAL = 20, 30


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Synthetic sequences: counting up mod the vocabulary from a random start."""

    def __init__(self, n: int = 48, length: int = 16) -> None:
        g = torch.Generator().manual_seed(7)
        start = torch.randint(0, 64, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_trainer(make: Factory, out_dir: Path, resume: Path | None, opts: list[Any]
                ) -> tuple[dict[int, float], list[np.ndarray]]:
    """Train the tiny GPT-2 to step TOTAL (saving at SAVE_AT), or resume from a
    checkpoint with a new model, optimizer and Trainer. Returns the loss of each step
    run and the final parameters."""
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    losses: dict[int, float] = {}

    class Recording(Trainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            value = loss[0] if isinstance(loss, tuple) else loss
            losses[self.state.global_step + 1] = value.item()
            return loss

    model = tiny_gpt2()
    opt = make(model.parameters(), lr=5e-3, weight_decay=0.01)
    opts.append(opt)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=TOTAL)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=TOTAL, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        eval_strategy="no")
    trainer = Recording(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    assert trainer.state.global_step == TOTAL
    return losses, snapshot(model.parameters())


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory: pytest.TempPathFactory
                      ) -> tuple[dict[int, float], list[np.ndarray]]:
    """torch.optim.AdamW's uninterrupted run, checked to equal its own resumed run."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("trainer-torch")
    made: list[Any] = []
    losses, params = run_trainer(factory("AdamW"), out, None, made)
    resumed_losses, resumed = run_trainer(factory("AdamW"), out / "resumed",
                                          out / f"checkpoint-{SAVE_AT}", made)
    assert sorted(resumed_losses) == list(range(SAVE_AT + 1, TOTAL + 1))
    for k, v in resumed_losses.items():
        assert v == pytest.approx(losses[k], rel=1e-6), k
    assert_trajectory([resumed], [params], rtol=1e-6, atol=1e-7,
                      what="torch resumed against torch uninterrupted")
    assert losses[TOTAL] < losses[1]  # it learned
    return losses, params


def assert_gpt2_close(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    """rtol 1e-5 (float32), but for the attention's key bias: softmax is invariant to it,
    so its gradient is float rounding noise, which Adam's normalised steps amplify into
    differences of ~1e-5 between any two implementations; it gets atol 1e-4."""
    names = [n for n, _ in tiny_gpt2().named_parameters()]
    width = 16  # n_embd: c_attn.bias is [query | key | value]
    for name, a, b in zip(names, got, want, strict=True):
        if name.endswith("attn.c_attn.bias"):
            key = slice(width, 2 * width)
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-4,
                                       err_msg=f"{name} (key part) after {what}")
            a, b = np.delete(a, np.s_[key]), np.delete(b, np.s_[key])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name} after {what}")


def test_hf_trainer_resume(url: str, sid: str, tmp_path: Path, opts: list[Any],
                           trainer_reference: tuple[dict[int, float], list[np.ndarray]]
                           ) -> None:
    """Trainer(optimizers=(adamserve AdamW, linear warmup)) saves at step 20; a new
    model, optimizer (new session) and Trainer resume from that checkpoint to step 30."""
    want_losses, want = trainer_reference
    losses, params = run_trainer(factory("AdamW", url, sid), tmp_path, None, opts)
    resumed_losses, resumed = run_trainer(factory("AdamW", url, f"{sid}-resumed"),
                                          tmp_path / "resumed",
                                          tmp_path / f"checkpoint-{SAVE_AT}", opts)
    # the uninterrupted run is torch's
    assert sorted(losses) == sorted(want_losses)
    np.testing.assert_allclose([losses[k] for k in sorted(losses)],
                               [want_losses[k] for k in sorted(losses)], rtol=1e-5)
    assert_gpt2_close(params, want, "the uninterrupted run")
    # the resumed run goes on where the checkpoint left off: as the uninterrupted run
    # (the same server arithmetic) and as torch
    steps = sorted(resumed_losses)
    assert steps == list(range(SAVE_AT + 1, TOTAL + 1))
    np.testing.assert_allclose([resumed_losses[k] for k in steps],
                               [losses[k] for k in steps], rtol=1e-5,
                               err_msg="losses of the resumed steps, against the "
                                       "uninterrupted run")
    assert_trajectory([resumed], [params], rtol=1e-5, atol=1e-6,
                      what="the resumed run against the uninterrupted run")
    np.testing.assert_allclose([resumed_losses[k] for k in steps],
                               [want_losses[k] for k in steps], rtol=1e-5,
                               err_msg="losses of the resumed steps, against torch")
    assert_gpt2_close(resumed, want, "the resumed run")


# -- accelerate: save_state / load_state ---------------------------------------------------

ACC_SAVE, ACC_TOTAL = 8, 16


def run_accelerate(make: Factory, ckpt: Path, resume: bool, opts: list[Any]
                   ) -> tuple[list[float], list[np.ndarray]]:
    """Train an MLP with accelerate to ACC_TOTAL steps, saving the state at ACC_SAVE;
    or, ``resume``: fresh objects, load_state, and the remaining steps."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = mlp(5, (4, 16, 1))
    opt = make(model.parameters(), lr=1e-2)
    opts.append(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    xs, ys = zip(*(batch(step) for step in range(ACC_TOTAL)), strict=True)
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    start = 0
    if resume:
        accelerator.load_state(str(ckpt))
        loader = accelerator.skip_first_batches(loader, ACC_SAVE)
        start = ACC_SAVE
    losses = []
    for step, (x, y) in enumerate(loader, start):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step + 1 == ACC_SAVE and not resume:
            accelerator.save_state(str(ckpt))
    assert step + 1 == ACC_TOTAL
    return losses, snapshot(accelerator.unwrap_model(model).parameters())


@pytest.fixture(scope="module")
def accelerate_reference(tmp_path_factory: pytest.TempPathFactory
                         ) -> tuple[list[float], list[np.ndarray]]:
    pytest.importorskip("accelerate")
    ckpt = tmp_path_factory.mktemp("accelerate-torch")
    made: list[Any] = []
    losses, params = run_accelerate(factory("Adam"), ckpt, False, made)
    resumed_losses, resumed = run_accelerate(factory("Adam"), ckpt, True, made)
    np.testing.assert_allclose(resumed_losses, losses[ACC_SAVE:], rtol=1e-6)
    assert_trajectory([resumed], [params], rtol=1e-6, atol=1e-7,
                      what="torch resumed against torch uninterrupted")
    return losses, params


def test_accelerate_save_and_load_state(url: str, sid: str, tmp_path: Path, opts: list[Any],
                                        accelerate_reference: tuple[list[float],
                                                                    list[np.ndarray]]
                                        ) -> None:
    """prepare(model, adamserve Adam, dataloader, scheduler), save_state at step 8; fresh
    model, optimizer (new session) and Accelerator: load_state, steps 9 to 16."""
    want_losses, want = accelerate_reference
    losses, params = run_accelerate(factory("Adam", url, sid), tmp_path, False, opts)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_trajectory([params], [want], rtol=1e-5, atol=1e-6,
                      what="the uninterrupted run against torch")
    resumed_losses, resumed = run_accelerate(factory("Adam", url, f"{sid}-resumed"), tmp_path,
                                             True, opts)
    np.testing.assert_allclose(resumed_losses, losses[ACC_SAVE:], rtol=1e-5,
                               err_msg="losses of the resumed steps, against the "
                                       "uninterrupted run")
    assert_trajectory([resumed], [params], rtol=1e-5, atol=1e-6,
                      what="the resumed run against the uninterrupted run")
    np.testing.assert_allclose(resumed_losses, want_losses[ACC_SAVE:], rtol=1e-5,
                               err_msg="losses of the resumed steps, against torch")
    assert_trajectory([resumed], [want], rtol=1e-5, atol=1e-6,
                      what="the resumed run against torch")
