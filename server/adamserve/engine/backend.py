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
            blocks: Blocks, coef: Array) -> None: ...

    def lamb_moments(self, slots: dict[str, Array], param: Array, grad: Array, blocks: Blocks,
                     coef: Array) -> tuple[F64, F64]: ...

    def scaled_sub(self, param: Array, update: Array, blocks: Blocks, scale: Array) -> None: ...

    def lerp_into(self, param: Array, end: Array, blocks: Blocks, coef: Array) -> None:
        """param = torch.lerp(param, end, w) with w = coef[segment, 0] (coef[:, 1] = 1)."""
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
