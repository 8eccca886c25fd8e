"""NumPy arrays as parameters, updated in place by ``opt.step(grads)``, with or without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import adamserve_client as ac

STEPS = 15


def test_numpy_parameters_match_torch(url: str, sid: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    w_id = id(w)
    tw, tb = torch.tensor(w), torch.tensor(b)
    opt = ac.AdamW([w, b], lr=1e-2, weight_decay=0.1, server=url, session=sid)
    ref = torch.optim.AdamW([tw, tb], lr=1e-2, weight_decay=0.1)
    try:
        for step in range(STEPS):
            gw = rng.standard_normal(w.shape).astype(np.float32)
            gb = None if step % 3 == 0 else rng.standard_normal(b.shape).astype(np.float32)
            opt.step([gw, gb])
            tw.grad = torch.tensor(gw)
            tb.grad = None if gb is None else torch.tensor(gb)
            ref.step()
            np.testing.assert_allclose(w, tw.numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(b, tb.numpy(), rtol=0, atol=1e-6)
        assert id(w) == w_id  # updated in place
        opt.zero_grad()  # a no-op for arrays
        sd = opt.state_dict()
        assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
        assert sd["state"][0]["step"] == STEPS and sd["state"][1]["step"] == STEPS - 5
        np.testing.assert_allclose(sd["state"][1]["exp_avg_sq"],
                                   ref.state_dict()["state"][1]["exp_avg_sq"].numpy(),
                                   rtol=1e-6, atol=1e-9)
        opt.load_state_dict(ref.state_dict())  # torch tensors load into NumPy mode too
        # gradients by name
        opt.step({"param.1": np.ones(3, np.float32)})
        assert opt.describe().step == STEPS + 1
    finally:
        opt.close(delete=True)


def test_numpy_mode_errors(url: str, sid: str) -> None:
    w = np.zeros((2, 2), np.float32)
    with pytest.raises(TypeError, match="float arrays"):
        ac.Adam([np.zeros(3, np.int64)], server=url)
    with pytest.raises(TypeError, match="all torch Tensors or all NumPy arrays"):
        ac.Adam([w, torch.zeros(2)], server=url)
    opt = ac.Adam([w], server=url, session=sid)
    try:
        with pytest.raises(ValueError, match="pass the gradients"):
            opt.step()
        with pytest.raises(ValueError, match=r"2 gradients for 1 parameters \(param\.0\)"):
            opt.step([np.zeros((2, 2)), np.zeros(2)])
        with pytest.raises(ValueError, match=r"gradient for 'param\.0' has shape \[4\]"):
            opt.step([np.zeros(4)])
        assert opt.describe().step == 0
    finally:
        opt.close(delete=True)


def test_numpy_mode_without_torch(url: str) -> None:
    """A process where torch cannot be imported still gets the optimizers, on NumPy."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        import numpy as np
        import adamserve_client as ac
        from adamserve_client import optim
        assert not optim.HAVE_TORCH and "torch" not in str(ac.Adam.__mro__)
        w = np.ones(5, dtype=np.float64)
        with ac.Adam([("w", w)], lr=0.1, server={url!r}) as opt:
            seen = []
            opt.register_step_post_hook(lambda o, a, k: seen.append(1))
            for _ in range(3):
                opt.step([np.full(5, 2.0)])
            assert seen == [1, 1, 1]
            sd = opt.state_dict()
            assert sd["param_groups"][0]["param_names"] == ["w"], sd
            assert sd["state"][0]["step"] == 3.0
        # three Adam steps on a constant gradient move each weight by 3 * lr
        np.testing.assert_allclose(w, 1 - 0.3, atol=1e-6)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_numpy_add_param_group_matches_torch(url: str, sid: str) -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    h = rng.standard_normal(5).astype(np.float32)
    tw, th = torch.tensor(w), torch.tensor(h)
    opt = ac.Adam([w], lr=1e-2, server=url, session=sid)
    ref = torch.optim.Adam([tw], lr=1e-2)
    try:
        for step in range(6):
            if step == 3:
                opt.add_param_group({"params": [h], "lr": 0.05, "amsgrad": True})
                ref.add_param_group({"params": [th], "lr": 0.05, "amsgrad": True})
            grads = [rng.standard_normal(a.shape).astype(np.float32)
                     for a in (w, h)[:len(opt.param_groups)]]
            opt.step(grads)
            for t, g in zip((tw, th), grads, strict=False):
                t.grad = torch.tensor(g)
            ref.step()
            np.testing.assert_allclose(w, tw.numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(h, th.numpy(), rtol=0, atol=1e-6)
        sd = opt.state_dict()
        assert sd["state"][0]["step"] == 6 and sd["state"][1]["step"] == 3
        assert "max_exp_avg_sq" in sd["state"][1] and "max_exp_avg_sq" not in sd["state"][0]
    finally:
        opt.close(delete=True)
