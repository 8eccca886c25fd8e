"""Adafactor (``torch.optim.Adafactor``, torch 2.13) over the flat buffers.

State: a tensor of two dims or more keeps its second moment factored over its last
two dims (the leading ones are a batch of matrices): ``row_var`` (one value per row,
torch's shape ``shape[:-1] + (1,)``) and ``col_var`` (one per column and matrix,
``shape[:-2] + (1, shape[-1])``); a tensor of fewer dims keeps ``variance``, its own
shape. Each slot is one flat buffer with its own offsets
(:meth:`~adamserve.engine.optimizer.FlatOptimizer.slot_offsets`), so a matrix costs
O(rows + cols), not O(rows · cols).

A step cannot be one fused pass: alpha needs ``||p||`` before the update, and the
update clipping ``||U||`` over the whole tensor. So, per step:

1. ``||p||²`` per tensor, before the weight decay (``segment_sumsq``);
2. the statistics (:meth:`Backend.adafactor_stats`): each row's and column's sum of
   (g·gs)² in float64, their means as torch forms them (the norm rounded to the
   state dtype, squared, divided by the count), lerped into row_var and col_var with
   w = t^beta2_decay, then per matrix max(mean(row_var), eps1);
3. ``||U||²`` per tensor (:meth:`Backend.adafactor_update`), U = g·gs /
   sqrt(max(v, eps1²)) with v = row_var·col_var / that mean (or ``variance``, lerped
   toward (g·gs)² in this pass);
4. ``p = p·(1 - lr·wd) + scale·U`` with ``scale = -alpha / max(1, RMS(U)/d)``, alpha =
   max(eps2, RMS(p))·min(lr, 1/sqrt(t)) computed on the host in torch's order.

U is computed twice (passes 3 and 4) rather than stored: the gradient buffer stays
as it came (shared memory and the rounds of several workers read it), and no scratch
buffer of the model's size is needed. About 28 bytes move per float32 element: p
read in 1, g in 2 (twice: rows and columns), g in 3, g and p read and p written in 4.

eps1 None is the machine epsilon of the session's dtype (torch: of the parameter's,
the same when the master dtype is the model's).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from adamserve.engine.backend import Array, FactorTasks
from adamserve.engine.optimizer import FlatOptimizer, StepReport, _Prepared

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

ROW_TASK = 1 << 15  # elements a statistics task reads: enough to amortise scheduling
STRIPE = 64  # columns of a column task: 256 B of float32 per row read

# The kernels' coefficient columns (one row per tensor, in the state dtype).
GS, DECAY, W, EPS1, EPS1_SQ, COLS, ROWS, SCALE, ONE = range(9)
# The meta table's columns (int64, one row per tensor).
META = ("start", "factored", "cols", "rows", "row_var", "col_var", "batch", "variance")


@dataclass(frozen=True)
class _Plan:
    """A layout's Adafactor tables: the meta table (on the device), the tasks (host),
    and each tensor's size, row and column counts."""

    layout: object  # the Layout it was built for (compared by identity)
    meta: Array
    rows: I64
    cols: I64
    stripes: I64
    batches: I64
    row_count: int
    batch_count: int
    numel: F64
    root_numel: F64  # numel ** 0.5, as torch's Python float
    ncols: F64
    nrows: F64
    full: FactorTasks  # the tasks of every tensor, on the device


_PLANS: weakref.WeakKeyDictionary[FlatOptimizer, _Plan] = weakref.WeakKeyDictionary()


def _build(opt: FlatOptimizer) -> _Plan:
    layout = opt.layout
    nseg = len(layout)
    roff, coff, voff = (opt.slot_offsets(n) for n in ("row_var", "col_var", "variance"))
    meta = np.zeros((nseg, len(META)), dtype=np.int64)
    rows: list[tuple[int, ...]] = []
    cols: list[tuple[int, ...]] = []
    stripes: list[tuple[int, ...]] = []
    batches: list[tuple[int, ...]] = []
    numel = np.zeros(nseg)
    ncols = np.ones(nseg)
    nrows = np.ones(nseg)
    nbatch = 0
    for i, t in enumerate(layout.tensors):
        start = int(layout.offsets[i])
        numel[i] = t.numel
        meta[i] = (start, 0, 0, 0, roff[i], coff[i], nbatch, voff[i])
        if len(t.shape) < 2:
            continue
        n, m = t.shape[-2], t.shape[-1]
        nmat = math.prod(t.shape[:-2])
        meta[i, 1:4] = (1, m, n)
        ncols[i], nrows[i] = m, n
        if t.numel == 0:
            nbatch += nmat
            continue
        per = max(1, ROW_TASK // m)
        for r in range(0, nmat * n, per):
            rows.append((i, start + r * m, min(per, nmat * n - r), int(roff[i]) + r, m))
        for b in range(nmat):
            first = start + b * n * m
            for c0 in range(0, m, STRIPE):
                width = min(STRIPE, m - c0)
                chunk = max(1, ROW_TASK // width)
                stripes.append((i, len(cols), -(-n // chunk), int(coff[i]) + b * m + c0, width))
                for r in range(0, n, chunk):
                    cols.append((i, first + r * m + c0, min(chunk, n - r), width, m))
            batches.append((i, int(roff[i]) + b * n, n, nbatch + b))
        nbatch += nmat

    def table(entries: list[tuple[int, ...]], width: int) -> I64:
        return np.array(entries, dtype=np.int64).reshape(len(entries), width)

    plan = _Plan(layout, opt.backend.to_device(meta), table(rows, 5), table(cols, 5),
                 table(stripes, 5), table(batches, 4), opt.slot_size("row_var"), nbatch,
                 numel, np.array([float(x) ** 0.5 for x in numel.tolist()]), ncols, nrows,
                 FactorTasks(None, None, None, None, 0, 0, STRIPE))
    return dataclasses.replace(plan, full=_tasks(opt, plan, None))


def _tasks(opt: FlatOptimizer, plan: _Plan, active: npt.NDArray[np.bool_] | None) -> FactorTasks:
    """The plan's tasks of the ``active`` tensors (None: all), on the device."""
    rows, cols, stripes, batches = plan.rows, plan.cols, plan.stripes, plan.batches
    if active is not None:
        keep = active[cols[:, 0]]
        renumbered = np.cumsum(keep) - 1  # a stripe's tasks are all kept or all dropped
        stripes = stripes[active[stripes[:, 0]]].copy()
        if len(stripes):
            stripes[:, 1] = renumbered[stripes[:, 1]]
        rows, cols, batches = rows[active[rows[:, 0]]], cols[keep], batches[active[batches[:, 0]]]
    dev = opt.backend.to_device
    return FactorTasks(dev(rows), dev(cols), dev(stripes), dev(batches), plan.row_count,
                       plan.batch_count, STRIPE)


def plan(opt: FlatOptimizer) -> _Plan:
    """The Adafactor tables of ``opt``'s layout (built once per layout)."""
    cached = _PLANS.get(opt)
    if cached is None or cached.layout is not opt.layout:
        cached = _PLANS[opt] = _build(opt)
    return cached


def _as_state(x: F64, opt: FlatOptimizer) -> F64:
    """``x`` rounded to the state dtype, as torch's ``tensor.norm().item()`` is."""
    return x.astype(opt.dtype).astype(np.float64)


def adafactor_step(opt: FlatOptimizer, prepared: _Prepared) -> StepReport:
    """One Adafactor step of the active tensors (see the module docstring)."""
    idx = prepared.idx
    if len(idx):
        p = plan(opt)
        nseg = len(opt.layout)
        c64 = prepared.coef64  # engine.algorithms._adafactor's columns, then a one
        coef = np.zeros((nseg, ONE + 1))
        coef[:, GS], coef[:, DECAY], coef[:, W] = c64[:, 0], c64[:, 2], c64[:, 3]
        eps1 = np.where(np.isnan(c64[:, 4]), float(np.finfo(opt.dtype).eps), c64[:, 4])
        coef[:, EPS1], coef[:, EPS1_SQ] = eps1, eps1 * eps1
        coef[:, COLS], coef[:, ROWS], coef[:, ONE] = p.ncols, p.nrows, 1.0
        rho, eps2, d = c64[:, 6], c64[:, 7], c64[:, 8]
        backend, slots, blocks = opt.backend, opt.slots, prepared.blocks
        device_coef = backend.to_device(coef.astype(opt.dtype))
        psq = backend.segment_sumsq(opt.param, blocks, nseg)  # before the weight decay
        active = None if len(idx) == nseg else np.isin(np.arange(nseg), idx)
        tasks = p.full if active is None else _tasks(opt, p, active)
        means = backend.adafactor_stats(prepared.grad, slots["row_var"], slots["col_var"],
                                        tasks, device_coef)
        args = (opt.param, prepared.grad, slots["variance"], slots["row_var"],
                slots["col_var"], means, blocks, p.meta)
        usq_blocks = backend.adafactor_update(*args, device_coef, False)
        usq = np.bincount(blocks.host_seg, weights=usq_blocks, minlength=nseg)
        # torch: max(eps2, p.norm(2).item() / numel ** 0.5) * rho, and
        # max(1.0, u.norm(2).item() / (numel ** 0.5 * d)): Python's max keeps its first
        # argument unless the second is larger
        with np.errstate(divide="ignore", invalid="ignore"):  # empty tensors: never run
            rms = _as_state(np.sqrt(psq), opt) / p.root_numel
            alpha = np.where(rms > eps2, rms, eps2) * rho
            ratio = _as_state(np.sqrt(usq), opt) / (p.root_numel * d)
            coef[:, SCALE] = -alpha / np.where(ratio > 1.0, ratio, 1.0)
        backend.adafactor_update(*args, backend.to_device(coef.astype(opt.dtype)), True)
    opt._advance(prepared.h, idx)
    return StepReport(opt.step_count, False, prepared.grad_norm)
