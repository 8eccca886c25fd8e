"""optax.lamb over the flat buffers: scale_by_adam, add_decayed_weights, scale_by_trust_ratio.

Per tensor, u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t) + eps_root) + eps) + wd·p and
p += (-lr)·(u·φ), with the trust ratio φ = ||p|| / ||u|| (1 where either norm is 0),
every scalar as optax forms it in the session's dtype. φ needs the whole tensor's u
before any element moves, so a step is two passes:

1. (:meth:`optax_lamb_sums`) the moments, and per block Σ p² and Σ u² (float64);
2. (``run("optax.lamb")``) u again from the new moments and the unchanged p, and the
   apply with φ in its coefficient column.

u is computed twice, bit for bit alike, rather than stored: the gradient buffer is only
read (shared memory and the rounds of several workers read it), and no scratch buffer
of the model's size is needed.
"""

from __future__ import annotations

from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

from adamserve.engine import algorithms as alg
from adamserve.engine.backend import Array, Blocks
from adamserve.engine.optimizer import FlatOptimizer, StepReport, _Prepared

F64 = npt.NDArray[np.float64]


class LambBackend(Protocol):
    """What optax.lamb needs of a backend beyond :class:`~adamserve.engine.backend.Backend`
    (both backends have it)."""

    def optax_lamb_sums(self, slots: dict[str, Array], param: Array, grad: Array,
                        blocks: Blocks, coef: Array) -> tuple[F64, F64]: ...


def trust_ratio(param_sumsq: F64, update_sumsq: F64, dtype: np.dtype[np.floating]) -> F64:
    """optax.scale_by_trust_ratio's φ = ||p|| / ||u|| in ``dtype`` (each norm rounded to
    it, as optax's are), 1 where either norm is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pn = np.sqrt(param_sumsq).astype(dtype)
        un = np.sqrt(update_sumsq).astype(dtype)
        ratio = pn / un
    out: F64 = np.where((pn == 0) | (un == 0), 1.0, ratio).astype(np.float64)
    return out


def optax_lamb_step(opt: FlatOptimizer, prepared: _Prepared) -> StepReport:
    """One optax.lamb step of the active tensors (see the module docstring)."""
    if len(prepared.idx):
        nseg = len(opt.layout)
        backend = cast(LambBackend, opt.backend)
        psq_b, usq_b = backend.optax_lamb_sums(opt.slots, opt.param, prepared.grad,
                                               prepared.blocks, prepared.coef)
        host_seg = prepared.blocks.host_seg
        psq = np.bincount(host_seg, weights=psq_b, minlength=nseg).astype(np.float64)
        usq = np.bincount(host_seg, weights=usq_b, minlength=nseg).astype(np.float64)
        coef = prepared.coef64.copy()
        coef[:, alg.OPTAX_LAMB_TRUST] = trust_ratio(psq, usq, opt.dtype)
        opt.backend.run(opt.algorithm.value, opt.slots, opt.param, prepared.grad,
                        prepared.blocks, opt.backend.to_device(coef.astype(opt.dtype)))
    opt._advance(prepared.h, prepared.idx)
    return StepReport(opt.step_count, False, prepared.grad_norm)
