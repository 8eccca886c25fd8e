"""SparseAdam (``torch.optim.SparseAdam``, torch 2.13): Adam on the rows a gradient touches.

A step is given, per tensor, the rows (along dim 0) whose gradient values were written
into the gradient buffer: ``rows[i]`` sorted and distinct, or None for every row (a
dense gradient). A row is ``numel / shape[0]`` consecutive elements; a 1-D tensor's
rows are its elements and a 0-d tensor is one row of one element. The values of the
other rows are never read (a lazy push leaves whatever was there), and only the given
rows change, moments and parameters alike. Every active tensor's step count advances,
rows or none, as torch's ``state["step"] += 1`` does for a gradient without values.

The rows are cut into a block table (:func:`row_blocks`): consecutive rows merge into
one run, a run is cut at the backend's block size, so the elementwise kernel
(``backend.run("sparse_adam", ...)``) and the non-finite check (``segment_sumsq``) read
the touched rows only; bytes moved are 28 per touched float32 element (p, m, v read
and written, g read), the rest of the model is not visited.

Per element, in the state dtype and in torch's order (``_functional.sparse_adam``):
``g = grad·gs`` (the clipping scale, negated for maximize), ``dm = (g - m)·(1-b1)``,
``m += dm``, ``dv = (g² - v)·(1-b2)``, ``v += dv``, ``p += -step_size·(m / (sqrt(v) +
eps))``, ``step_size = lr·sqrt(1 - b2^t)/(1 - b1^t)`` in Python floats. torch adds
``dm + m_old`` for the numerator and ``dv + v_old`` under the root, the same sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from adamserve.engine.backend import Backend, Blocks, make_blocks
from adamserve.errors import shown

if TYPE_CHECKING:
    from adamserve.engine.optimizer import Layout

I64 = npt.NDArray[np.int64]
Rows = Sequence[npt.NDArray[np.int64] | None]


def row_count(shape: tuple[int, ...]) -> int:
    """Rows of a tensor of ``shape``: its first dim, or 1 for a 0-d tensor."""
    return shape[0] if shape else 1


def _runs(rows: I64, name: str, nrows: int) -> tuple[I64, I64]:
    """The first and last row of each run of consecutive ``rows``, after checking that
    they are sorted, distinct and in range (ValueError naming the tensor)."""
    if rows.ndim != 1:
        raise ValueError(f"rows of tensor {shown(name)}: expected a 1-D array of row "
                         f"indices, got shape {list(rows.shape)}")
    if not len(rows):
        return rows, rows
    step = np.diff(rows)
    if (step <= 0).any():
        k = int(np.flatnonzero(step <= 0)[0])
        raise ValueError(f"rows of tensor {shown(name)}: expected sorted, distinct row "
                         f"indices; row {int(rows[k + 1])} follows {int(rows[k])}")
    if rows[0] < 0 or rows[-1] >= nrows:
        bad = int(rows[0] if rows[0] < 0 else rows[-1])
        raise ValueError(f"rows of tensor {shown(name)}: row {bad} is out of range; expected "
                         f"rows in [0, {nrows})")
    breaks = np.flatnonzero(step != 1)
    first = rows[np.concatenate(([0], breaks + 1))]
    last = rows[np.concatenate((breaks, [len(rows) - 1]))]
    return first, last


def row_blocks(backend: Backend, layout: Layout, active: npt.NDArray[np.bool_],
               rows: Rows) -> Blocks:
    """The block table over the given rows of the ``active`` tensors (``rows[i]`` None:
    all of tensor i): runs of consecutive rows, cut at ``backend.block`` elements."""
    if len(rows) != len(layout):
        raise ValueError(f"rows: expected one entry per tensor ({len(layout)}), got {len(rows)}")
    starts: list[I64] = []
    ends: list[I64] = []
    segs: list[I64] = []
    for i in np.flatnonzero(active).tolist():
        t = layout.tensors[i]
        lo, numel = int(layout.offsets[i]), t.numel
        given = rows[i]
        if given is None:
            first, last = np.zeros(1, np.int64), np.full(1, row_count(t.shape) - 1, np.int64)
        else:
            arr = np.asarray(given)
            if arr.size and arr.dtype.kind not in "iu":
                raise ValueError(f"rows of tensor {shown(t.name)}: expected integer row "
                                 f"indices, got {arr.dtype}")
            first, last = _runs(arr.astype(np.int64, copy=False), t.name, row_count(t.shape))
        if numel == 0 or not len(first):
            continue
        width = numel // row_count(t.shape)
        starts.append(lo + first * width)
        ends.append(lo + (last + 1) * width)
        segs.append(np.full(len(first), i, dtype=np.int64))
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return Blocks(backend.to_device(empty), backend.to_device(empty),
                      backend.to_device(empty), empty, 0)
    start, end, seg = np.concatenate(starts), np.concatenate(ends), np.concatenate(segs)
    block = backend.block
    pieces = (end - start + block - 1) // block
    if (pieces > 1).any():  # a long run: cut it as block_table cuts a tensor
        which = np.repeat(np.arange(len(start)), pieces)
        k = np.arange(len(which)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        start = start[which] + k * block
        end = np.minimum(start + block, end[which])
        seg = seg[which]
    return Blocks(backend.to_device(start), backend.to_device(end), backend.to_device(seg), seg,
                  int((end - start).sum()))


def step_blocks(backend: Backend, layout: Layout, active: npt.NDArray[np.bool_] | None,
                rows: Rows | None, every: Blocks) -> Blocks:
    """The blocks a SparseAdam step reads and writes: ``every`` (the whole model's, when
    all tensors are active and dense), else those of the active tensors' rows."""
    if rows is not None and len(rows) != len(layout):
        raise ValueError(f"rows: expected one entry per tensor ({len(layout)}), got {len(rows)}")
    if rows is None or all(r is None for r in rows):
        if active is None:
            return every
        return make_blocks(backend, layout.offsets, active)
    mask = np.ones(len(layout), dtype=bool) if active is None else active
    return row_blocks(backend, layout, mask, rows)
