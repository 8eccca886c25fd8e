"""What the service tests share: a service over a CPU store, and gradients."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService, TensorChunk
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore

SHAPES = {"w": (4, 3), "b": (3,)}


def service(data: Path | None, limits: Limits | None = None, every: int = 0,
            store_cls: type[CheckpointStore] = CheckpointStore) -> OptimizerService:
    """A started service; ``data`` None: without checkpoints."""
    checkpoints = store_cls(data) if data is not None else None
    svc = OptimizerService(SessionStore(CpuBackend(), checkpoints, limits or Limits()),
                           checkpoint_every_steps=every)
    svc.start()
    return svc


def gradients(seed: int = 0, shapes: Mapping[str, tuple[int, ...]] = SHAPES
              ) -> list[TensorChunk]:
    rng = np.random.default_rng(seed)
    return [TensorChunk(k, s, "FP32", rng.standard_normal(s).astype(np.float32).tobytes())
            for k, s in shapes.items()]
