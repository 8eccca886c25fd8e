"""optax.adafactor (optax 0.2's alias) over the flat buffers.

optax's chain: scale_by_factored_rms, clip_by_block_rms(clipping_threshold),
scale_by_learning_rate, scale_by_param_block_rms, ema(momentum), add_decayed_weights
(weight_decay_rate), scale(-1); each link whose argument is None is left out. Per
tensor of count c (its steps before this one) and g its gradient:

    d = 1 - (c - decay_offset + 1)^-decay_rate       (float32, as optax's _decay_rate_pow)
    G = g² + eps
    factored (table.optax_factored_dims: the two largest dims d0 > d1, the second at
    least min_dim_size_to_factor):
        v_row = d v_row + (1-d) mean_{d0}(G),  v_col = d v_col + (1-d) mean_{d1}(G)
        U = (g · (v_row / mean_{d1}(v_row))^-½) · v_col^-½
    else:
        v = d v + (1-d) G,  U = g · v^-½
    u = ((U / max(1, RMS(U)/clipping_threshold)) · lr) · max(RMS(p), 1e-3)
    [e = (1-momentum) u + momentum e, u = e]; u += weight_decay_rate · p; p -= u

A factored tensor is viewed as (A, Ni, B, Nj, C) with its factored axes i < j (any
two axes, not only the last two). A step is up to four passes:

1. Σ p² per tensor (multiply_by_parameter_scale), before anything moves;
2. the statistics (:meth:`optax_adafactor_stats`): per row and per column stripe the
   sums of G in float64 (rounded to the state dtype, then divided, as jnp.mean), the
   new v_row and v_col, and their factors rf and cf in two scratch buffers of their
   sizes (O(rows + columns));
3. Σ U² per tensor (clipping_threshold not None), which also moves v;
4. the apply, U computed again (bit for bit), the clipping denominator and the
   parameter scale computed on the host in the session's dtype.

The state is laid out when the session is created by optax's default factoring rule
(the table's slot shapes): ``min_dim_size_to_factor`` and ``factored`` take their
defaults only (:mod:`adamserve.engine.algorithms` refuses others).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

from adamserve.engine import algorithms as alg
from adamserve.engine.backend import Array, Blocks
from adamserve.engine.kernels_cpu import (
    OF_CD,
    OF_D,
    OF_EPS,
    OF_GS,
    OF_LR,
    OF_MOM,
    OF_MOM_ON,
    OF_NARROW,
    OF_NI,
    OF_NJ,
    OF_NROW,
    OF_OMD,
    OF_OMM,
    OF_ONE,
    OF_PRMS,
    OF_WDR,
)
from adamserve.engine.optimizer import FlatOptimizer, StepReport, _Prepared
from adamserve.errors import FailedPrecondition, shown
from adamserve_proto import algorithms as table

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

ROW_TASK = 1 << 15  # elements a rows task reads
STRIPE = 64  # elements per row of a column task

# the kernels' columns from engine.algorithms' (by name), and the plan's counts
_FROM_HOST = {OF_D: "d", OF_OMD: "omd", OF_EPS: "eps", OF_LR: "lr", OF_MOM_ON: "momentum_on",
              OF_MOM: "momentum", OF_OMM: "omm", OF_NARROW: "round_ema",
              OF_WDR: "weight_decay_rate"}


class AdafactorBackend(Protocol):
    """What optax.adafactor needs of a backend beyond
    :class:`~adamserve.engine.backend.Backend` (both backends have it)."""

    def optax_adafactor_stats(self, grad: Array, v_row: Array, v_col: Array, rf: Array,
                              cf: Array, rows: Array, cols: Array, norms: Array, meta: Array,
                              coef: Array) -> None: ...

    def optax_adafactor_update(self, param: Array, grad: Array, v: Array, rf: Array, cf: Array,
                               ema: Array | None, blocks: Blocks, meta: Array, coef: Array,
                               mode: int) -> F64 | None: ...


@dataclass(frozen=True)
class _Plan:
    """A layout's tables: the meta table (device), the tasks (host and device), counts."""

    layout: object  # the Layout it was built for (compared by identity)
    meta: Array  # [tensors, 11] start, factored, A, Ni, B, Nj, C, ROWR, v_row, v_col, v
    rows: I64  # [R, 4] segment, a, x0, rows
    cols: I64  # [S, 5] segment, a, b, y0, columns
    norms: I64  # [N, 4] segment, first v_row index, count, stride
    device: tuple[Array, Array, Array]  # rows, cols, norms of every tensor, on the device
    numel: F64
    counts: F64  # [tensors, 3] Ni, Nj, N(d1) (ones for an unfactored tensor)


_PLANS: weakref.WeakKeyDictionary[FlatOptimizer, _Plan] = weakref.WeakKeyDictionary()


def _factoring(opt: FlatOptimizer, i: int) -> tuple[int, int] | None:
    """Tensor ``i``'s factored axes (d1, d0) under its group, checked against the slots
    the session holds (laid out by optax's default rule)."""
    t = opt.layout.tensors[i]
    dims = table.optax_factored_dims(t.shape, opt.groups[t.group])
    expected = (0 if dims is None else
                math.prod(s for k, s in enumerate(t.shape) if k != dims[1]))
    held = opt.slot_span("v_row", i)
    if held.stop - held.start != expected:
        raise FailedPrecondition(
            f"tensor {shown(t.name)}: its optax.adafactor state was laid out for another "
            "factoring than its group's min_dim_size_to_factor and factored ask for; "
            "nothing was applied")
    return dims


def _build(opt: FlatOptimizer) -> _Plan:
    layout = opt.layout
    nseg = len(layout)
    roff, coff, voff = (opt.slot_offsets(n) for n in ("v_row", "v_col", "v"))
    meta = np.zeros((nseg, 11), dtype=np.int64)
    counts = np.ones((nseg, 3))
    rows: list[tuple[int, ...]] = []
    cols: list[tuple[int, ...]] = []
    norms: list[tuple[int, ...]] = []
    for s, t in enumerate(layout.tensors):
        start = int(layout.offsets[s])
        meta[s, 0], meta[s, 8:] = start, (roff[s], coff[s], voff[s])
        dims = _factoring(opt, s)
        if dims is None:
            continue
        d1, d0 = dims
        i, j = sorted(dims)
        shape = t.shape
        na, ni, nb, nj, nc = (math.prod(shape[:i]), shape[i], math.prod(shape[i + 1:j]),
                              shape[j], math.prod(shape[j + 1:]))
        rowr = d0 == j  # v_row reduces over j (the R statistic)
        meta[s, 1:8] = (1, na, ni, nb, nj, nc, rowr)
        counts[s] = (ni, nj, shape[d1])
        per = max(1, ROW_TASK // (nb * nj * nc))
        ny = max(1, STRIPE // nc)
        for a in range(na):
            rows.extend((s, a, x0, min(per, ni - x0)) for x0 in range(0, ni, per))
            for b in range(nb):
                cols.extend((s, a, b, y0, min(ny, nj - y0)) for y0 in range(0, nj, ny))
                for c in range(nc):
                    if rowr:  # v_row (a, x, b, c): over x
                        norms.append((s, int(roff[s]) + (a * ni * nb + b) * nc + c, ni, nb * nc))
                    else:  # v_row (a, b, y, c): over y
                        norms.append((s, int(roff[s]) + (a * nb + b) * nj * nc + c, nj, nc))

    def tab(entries: list[tuple[int, ...]], width: int) -> I64:
        return np.array(entries, dtype=np.int64).reshape(len(entries), width)

    rows_t, cols_t, norms_t = tab(rows, 4), tab(cols, 5), tab(norms, 4)
    dev = opt.backend.to_device
    return _Plan(layout, dev(meta), rows_t, cols_t, norms_t,
                 (dev(rows_t), dev(cols_t), dev(norms_t)),
                 np.array([float(t.numel) for t in layout.tensors]), counts)


def plan(opt: FlatOptimizer) -> _Plan:
    """The tables of ``opt``'s layout (built once per layout)."""
    cached = _PLANS.get(opt)
    if cached is None or cached.layout is not opt.layout:
        cached = _PLANS[opt] = _build(opt)
    return cached


def _host_scalars(opt: FlatOptimizer, c64: F64, numel: F64, psq: F64, usq: F64 | None) -> tuple[
        F64, F64]:
    """The clipping denominators max(1, RMS(U)/threshold) and the parameter scales
    max(RMS(p), 1e-3) per tensor, in the session's dtype as optax computes them (1 where
    off)."""
    f = opt.dtype.type
    col = alg.optax_column
    with np.errstate(divide="ignore", invalid="ignore"):  # empty tensors: never applied
        n = numel.astype(opt.dtype)
        ones = np.ones(len(numel))
        cd = ones
        if usq is not None:
            rms = np.sqrt(usq.astype(opt.dtype) / n)
            denom = np.maximum(f(1), rms / c64[:, col("threshold")].astype(opt.dtype))
            cd = np.where(c64[:, col("clip")] > 0, denom, 1.0)
        prms = np.sqrt(psq.astype(opt.dtype) / n)
        prms = np.where(prms <= f(1e-3), f(1e-3), prms)
        scale = np.where(c64[:, col("param_scale")] > 0, prms, 1.0)
    return cd.astype(np.float64), scale.astype(np.float64)


def optax_adafactor_step(opt: FlatOptimizer, prepared: _Prepared) -> StepReport:
    """One optax.adafactor step of the active tensors (see the module docstring)."""
    idx = prepared.idx
    if len(idx):
        p = plan(opt)
        nseg = len(opt.layout)
        c64 = prepared.coef64
        coef = np.zeros((nseg, OF_ONE + 1))
        coef[:, OF_GS] = c64[:, 0]
        for k, name in _FROM_HOST.items():
            coef[:, k] = c64[:, alg.optax_column(name)]
        coef[:, OF_NI], coef[:, OF_NJ], coef[:, OF_NROW] = p.counts.T
        coef[:, OF_CD] = coef[:, OF_PRMS] = coef[:, OF_ONE] = 1.0
        backend, slots, blocks = opt.backend, opt.slots, prepared.blocks
        fast = cast(AdafactorBackend, backend)
        if len(idx) == nseg:
            rows, cols, norms = p.device
        else:
            active = np.zeros(nseg, dtype=bool)
            active[idx] = True
            rows, cols, norms = (backend.to_device(x[active[x[:, 0]]])
                                 for x in (p.rows, p.cols, p.norms))
        zeros = np.zeros(nseg)
        scaled = c64[idx, alg.optax_column("param_scale")] > 0
        psq = backend.segment_sumsq(opt.param, blocks, nseg) if scaled.any() else zeros
        rf = backend.zeros(opt.slot_size("v_row"), opt.dtype)
        cf = backend.zeros(opt.slot_size("v_col"), opt.dtype)
        fast.optax_adafactor_stats(prepared.grad, slots["v_row"], slots["v_col"], rf, cf, rows,
                                   cols, norms, p.meta, backend.to_device(coef.astype(opt.dtype)))
        args = (opt.param, prepared.grad, slots["v"], rf, cf, slots.get("ema"), blocks, p.meta)
        usq: F64 | None = None
        if (c64[idx, alg.optax_column("clip")] > 0).any():
            sums = fast.optax_adafactor_update(*args, backend.to_device(coef.astype(opt.dtype)),
                                               0)
            usq = np.bincount(blocks.host_seg, weights=sums, minlength=nseg).astype(np.float64)
        coef[:, OF_CD], coef[:, OF_PRMS] = _host_scalars(opt, c64, p.numel, psq, usq)
        fast.optax_adafactor_update(*args, backend.to_device(coef.astype(opt.dtype)),
                                    2 if usq is None else 1)
    opt._advance(prepared.h, idx)
    return StepReport(opt.step_count, False, prepared.grad_norm)
