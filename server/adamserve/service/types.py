"""The domain types the service speaks to both transports, and a session's description."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from adamserve.engine import algorithms as alg
from adamserve.engine import schedules, statedict
from adamserve.engine.optimizer import TensorSpec
from adamserve.sessions import names
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import Session


@dataclass(frozen=True)
class TensorChunk:
    """Part (or all) of one named tensor, as raw little-endian bytes.

    ``offset`` is the index of the chunk's first element in the flattened tensor;
    the chunks of one tensor arrive in order. ``rows`` (int64 little-endian row
    indices): a row-sparse chunk, ``data`` holding those rows' values, row after row.
    """

    name: str
    shape: tuple[int, ...]
    datatype: str
    data: bytes | memoryview
    offset: int = 0
    rows: bytes | memoryview | None = None


@dataclass(frozen=True)
class SessionInfo:
    id: str
    algorithm: str
    dtype: str
    step: int
    tensors: tuple[TensorSpec, ...]
    groups: tuple[dict[str, Any], ...]
    lr: tuple[float, ...]  # the lr the next step will use, per group
    schedule: dict[str, Any] | None
    max_grad_norm: float | None
    clip_per_tensor: bool
    skip_nonfinite: bool
    state_bytes: int
    checkpointed_step: int
    backend: str
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    labels: dict[str, str] = field(default_factory=dict)
    tenant: str = ""  # the owner; "" the default tenant (an admin addresses tenant~id)
    semantics: str = "torch"
    state_dtype: str = "float32"  # the moments' precision
    moment_bytes: int = 0
    bytes_per_parameter: float = 0.0  # master parameters and moments, per parameter

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass(frozen=True)
class StepResult:
    step: int
    skipped: bool
    grad_norm: float | None
    nonfinite: tuple[str, ...]
    params: list[TensorChunk] = field(default_factory=list)
    duplicate: bool = False  # this (worker, sequence) was applied before: acknowledged only
    staleness: int = 0  # steps between the push's base_step and the step it was applied to
    pending: bool = False  # in a round not applied yet (or staged for its commit)
    contributors: int = 0  # pushes averaged into a round's step (0: not a round)
    missing: tuple[str, ...] = ()  # workers of the previous round absent from this one
    # a staged step's sums of squares per tensor of the session, for the commit
    grad_sumsq: tuple[float, ...] = ()
    param_sumsq: tuple[float, ...] = ()  # LAMB, after the first commit
    update_sumsq: tuple[float, ...] = ()
    round: int = 0  # the round the push joined (sync), for its commit


def session_info(s: Session) -> SessionInfo:
    opt = s.opt
    tenant, bare = names.split(s.id)
    lr, schedule = _scheduled(s)
    return SessionInfo(
        id=bare,
        tenant=tenant,
        algorithm=s.config.algorithm,
        dtype=s.config.dtype,
        step=opt.step_count,
        tensors=opt.layout.tensors,
        groups=tuple(statedict.torch_group(h) for h in opt.groups),
        lr=lr,
        schedule=schedule,
        max_grad_norm=opt.clip.max_norm,
        clip_per_tensor=opt.clip.per_tensor,
        skip_nonfinite=opt.skip_nonfinite,
        state_bytes=s.state_bytes,
        checkpointed_step=s.checkpointed_step,
        backend=opt.backend.name,
        workers=s.config.workers,
        labels=dict(s.config.labels),
        semantics=s.config.semantics,
        state_dtype=opt.state_dtype,
        moment_bytes=opt.slot_bytes(),
        bytes_per_parameter=s.bytes_per_parameter,
    )


log = logging.getLogger("adamserve.service")
_faulty: set[str] = set()  # sessions described from what is safe, logged once each


def _scheduled(s: Session) -> tuple[tuple[float, ...], dict[str, Any] | None]:
    """The lr each group's next step uses, and the schedule. A schedule this server's
    bounds refuse (kept from an older server) or that cannot compute its lr is
    described as none, with the groups' base lrs, and logged once: one session's
    schedule never fails a listing of every session."""
    opt = s.opt
    try:
        schedule = opt.schedule.to_dict() if opt.schedule is not None else None
        if schedule is not None:
            schedules.schedule_from_dict(schedule)  # what every wire can carry
        lrs = tuple(opt.current_lr(g) for g in range(len(opt.groups)))
        if not all(math.isfinite(x) for x in lrs):
            raise ValueError(f"a non-finite lr {lrs}")
        return lrs, schedule
    except Exception:
        if s.id not in _faulty:
            _faulty.add(s.id)
            log.exception("session %s: its schedule fails this server's checks or cannot "
                          "compute the lr of step %d; described without it", s.id,
                          opt.step_count)
        return tuple(alg.base_lr(opt.algorithm, h) for h in opt.groups), None
