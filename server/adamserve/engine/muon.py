"""Muon (torch.optim.Muon, torch 2.13): momentum, Newton-Schulz, apply.

A step has three phases, in torch's order per tensor:

1. one elementwise kernel over the active tensors (``backend.run("muon", ...)``):
   ``b = lerp(b, g, 1-mu)`` and, written over the gradient buffer, the update
   ``u = lerp(g, b, mu)`` (nesterov) or ``b``;
2. per active tensor, ``u`` orthogonalised by the Newton-Schulz iteration
   (``backend.newton_schulz``: GEMMs, BLAS on the CPU and cuBLAS on CUDA) in place;
3. one elementwise kernel (``backend.decay_add``): ``p = p (1 - lr wd) - lr adj u``,
   torch's ``mul_`` then ``add_``.

The iteration runs in the state dtype; torch's runs in bfloat16, so results agree
with torch to the bfloat16 iteration's error (about 3e-4 relative after 30 steps),
and to rounding with torch's iteration done in the parameter's dtype.

Muon keeps no step count: a tensor's ``seg_step`` only says that it has state.
Every tensor of a Muon session is 2-D (:func:`check_shapes`, at creation and when
tensors are added), and a matrix is never split across shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from adamserve.engine import algorithms as alg
from adamserve_proto import algorithms as table

if TYPE_CHECKING:
    from adamserve.engine.optimizer import FlatOptimizer, StepReport, TensorSpec, _Prepared


def check_shapes(tensors: Iterable[TensorSpec]) -> None:
    """torch's refusal of a parameter that is not 2-D, naming the tensor (ValueError)."""
    for t in tensors:
        if len(t.shape) != 2:
            raise ValueError(
                f"Muon only supports 2D parameters whereas we found a parameter with size: "
                f"{list(t.shape)} (tensor {t.name!r}); optimize it with another algorithm, "
                "e.g. AdamW, in a session of its own")


def adjusted_lr(lr: float, choice: float, shape: tuple[int, ...]) -> float:
    """torch's ``_adjust_lr``: lr·sqrt(max(1, A/B)) for None and "original" (choices 0
    and 1), lr·0.2·sqrt(max(A, B)) for "match_rms_adamw", in Python floats."""
    a, b = shape[:2]
    name = table.CHOICES["adjust_lr_fn"][int(choice)]
    if name is None or name == "original":
        ratio = math.sqrt(max(1, a / b))
    else:
        ratio = 0.2 * math.sqrt(max(a, b))
    return lr * ratio


def newton_schulz(x: Any, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> Any:
    """torch.optim._muon._zeropower_via_newtonschulz on a 2-D NumPy or CuPy array, in its
    dtype (torch's runs in bfloat16): GEMMs through ``@`` (BLAS, cuBLAS); a tall matrix
    is iterated as its transpose (a view), as torch does."""
    a, b, c = (float(v) for v in coefficients)  # Python floats keep x's dtype
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / ((y * y).sum() ** 0.5).clip(eps, None)  # no host sync on a device
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * (gram @ gram)) @ y
    return y.T if tall else y


def muon_step(opt: FlatOptimizer, prepared: _Prepared) -> StepReport:
    """One Muon step of the active tensors (the three phases of the module docstring)."""
    from adamserve.engine.optimizer import StepReport

    idx, h, be = prepared.idx, prepared.h, opt.backend
    if len(idx):
        update = prepared.grad
        be.run(alg.Algorithm.MUON.value, opt.slots, opt.param, update, prepared.blocks,
               prepared.coef)
        lr = prepared.coef64[:, alg.MUON_LR_COLUMN]
        apply = np.zeros((len(opt.layout), 2), dtype=np.float64)
        apply[:, 0] = prepared.coef64[:, alg.COMMON_COLUMNS - 1]  # 1 - lr·wd
        for k, i in enumerate(idx.tolist()):
            t = opt.layout.tensors[i]
            u = update[opt.layout.span(i)].reshape(t.shape)
            u[...] = be.newton_schulz(
                u, (float(h["ns_a"][k]), float(h["ns_b"][k]), float(h["ns_c"][k])),
                int(h["ns_steps"][k]), float(h["eps"][k]))
            apply[i, 1] = -adjusted_lr(float(lr[i]), float(h["adjust_lr_fn"][k]), t.shape)
        be.decay_add(opt.param, update, prepared.blocks, be.to_device(apply.astype(opt.dtype)))
    opt._advance(h, idx)
    return StepReport(opt.step_count, False, prepared.grad_norm)
