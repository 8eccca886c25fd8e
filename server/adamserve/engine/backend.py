"""The seam between the optimizer state and the device that runs its kernels.

Two implementations: :class:`~adamserve.engine.kernels_cpu.CpuBackend` (NumPy +
numba) and ``kernels_cuda.CudaBackend`` (CuPy). ``select_backend`` picks one at run
time; CUDA is imported only when asked for, so a CPU-only install never needs CuPy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger("adamserve.engine")

# A flat device buffer: numpy.ndarray on the CPU backend, cupy.ndarray on CUDA.
Array = Any
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Blocks:
    """Block table: chunks of the flat buffers that never cross a tensor boundary."""

    start: Array  # int64[blocks]
    end: Array  # int64[blocks]
    seg: Array  # int64[blocks], the tensor (segment) each block belongs to
    host_seg: I64  # the same as ``seg``, on the host (for bincount over partial sums)
    size: int = 0  # elements covered by all blocks


@dataclass(frozen=True)
class FactorTasks:
    """Adafactor's work over the factored tensors (2 dims or more) of one step, as
    :mod:`adamserve.engine.adafactor` cuts it; int64 device tables. Element and slot
    indices are absolute (into the flat gradient, row_var and col_var buffers)."""

    rows: Array  # [R, 5] segment, first element, rows, first row_var index, row length m
    cols: Array  # [C, 5] segment, first element, rows, columns (<= STRIPE), row length m
    stripes: Array  # [S, 5] segment, first cols task, cols tasks, first col_var index, columns
    batches: Array  # [B, 4] segment, first row_var index, rows n, its index in the row means
    row_count: int  # row_var elements (the row sums' buffer)
    batch_count: int  # matrices of all factored tensors (the row means' buffer)
    stripe: int  # the most columns of a cols task


def block_table(offsets: I64, block: int, active: npt.NDArray[np.bool_] | None = None) -> tuple[
        I64, I64, I64]:
    """Cut segments ``[offsets[i], offsets[i+1])`` into blocks of at most ``block`` elements."""
    starts: list[I64] = []
    segs: list[I64] = []
    for s in range(len(offsets) - 1):
        if active is not None and not active[s]:
            continue
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        if hi == lo:
            continue
        st = np.arange(lo, hi, block, dtype=np.int64)
        starts.append(st)
        segs.append(np.full(st.shape, s, dtype=np.int64))
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    start = np.concatenate(starts)
    seg = np.concatenate(segs)
    end = np.minimum(start + block, offsets[seg + 1])
    return start, end, seg


class Backend(Protocol):
    """What the optimizer state needs from a device."""

    name: str
    block: int

    def memory_bytes(self) -> int: ...

    def zeros(self, n: int, dtype: np.dtype[Any]) -> Array: ...

    def to_device(self, host: npt.NDArray[Any]) -> Array: ...

    def to_host(self, x: Array) -> npt.NDArray[Any]: ...

    def segment_sumsq(self, x: Array, blocks: Blocks, nseg: int) -> F64: ...

    def run(self, algorithm: str, slots: dict[str, Array], param: Array, grad: Array,
            blocks: Blocks, coef: Array) -> None:
        """One fused elementwise pass of ``algorithm`` over ``blocks``; SparseAdam's
        ("sparse_adam") cover only the touched rows (:mod:`adamserve.engine.sparse_adam`),
        so it reads and writes nothing else."""
        ...

    def lamb_moments(self, slots: dict[str, Array], param: Array, grad: Array, blocks: Blocks,
                     coef: Array) -> tuple[F64, F64]: ...

    def scaled_sub(self, param: Array, update: Array, blocks: Blocks, scale: Array) -> None: ...

    def lerp_into(self, param: Array, end: Array, blocks: Blocks, coef: Array) -> None:
        """param = torch.lerp(param, end, w) with w = coef[segment, 0] (coef[:, 1] = 1)."""
        ...

    def adafactor_stats(self, grad: Array, row_var: Array, col_var: Array, tasks: FactorTasks,
                        coef: Array) -> Array:
        """Adafactor's factored statistics: row_var and col_var lerped toward the row and
        column means of (g·gs)², and the row means of the new row_var per matrix, clamped
        below at eps1 (returned); see :mod:`adamserve.engine.adafactor` for ``coef``."""
        ...

    def adafactor_update(self, param: Array, grad: Array, variance: Array, row_var: Array,
                         col_var: Array, row_means: Array, blocks: Blocks, meta: Array,
                         coef: Array, apply: bool) -> F64 | None:
        """Adafactor's update U over ``blocks``: the sum of U² per block (float64, host),
        lerping ``variance`` of the tensors of fewer than 2 dims; or with ``apply``,
        p = p·decay + scale·U instead."""
        ...

    def decay_add(self, param: Array, update: Array, blocks: Blocks, coef: Array) -> None:
        """param = param·coef[segment, 0] + coef[segment, 1]·update (Muon's apply)."""
        ...

    def newton_schulz(self, x: Array, coefficients: tuple[float, float, float], steps: int,
                      eps: float) -> Array:
        """Muon's orthogonalisation of the 2-D ``x`` (a new array), GEMMs on the device."""
        ...


def make_blocks(backend: Backend, offsets: I64,
                active: npt.NDArray[np.bool_] | None = None) -> Blocks:
    start, end, seg = block_table(offsets, backend.block, active)
    return Blocks(backend.to_device(start), backend.to_device(end), backend.to_device(seg), seg,
                  int((end - start).sum()))


def select_backend(device: str = "auto") -> Backend:
    """``cpu``, ``cuda`` (fail if absent) or ``auto`` (CUDA when CuPy sees a device)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {device!r}")
    if device in ("auto", "cuda"):
        reason = ""
        try:
            from adamserve.engine import kernels_cuda

            if kernels_cuda.device_count() > 0:
                backend: Backend = kernels_cuda.CudaBackend()
                log.info("engine backend: cuda (%s)", kernels_cuda.device_name())
                return backend
            reason = "CuPy found no CUDA device"
        except ImportError as exc:
            reason = f"CuPy is not importable ({exc})"
        if device == "cuda":
            raise RuntimeError(f"device=cuda requested but {reason}")
        log.info("engine backend: cpu (%s; falling back to the fused CPU kernels)", reason)
    from adamserve.engine.kernels_cpu import CpuBackend

    return CpuBackend()
