"""A session: one named optimizer, its flat state, the lock that serialises its steps,
and the invariants every change keeps (see :class:`Session`)."""

from __future__ import annotations

import logging
import numbers
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adamserve import metrics
from adamserve.engine import algorithms as alg
from adamserve.engine import schedules
from adamserve.engine.backend import Backend
from adamserve.engine.moments import moment_bytes
from adamserve.engine.optimizer import (
    ClipConfig,
    FlatOptimizer,
    Layout,
    StepReport,
    TensorSpec,
    slot_offsets,
)
from adamserve.errors import InvalidArgument, shown
from adamserve.sessions.coordinator import Round, RoundCoordinator, RoundState
from adamserve.sessions.history import History, lrs_at
from adamserve.sessions.pushlog import PushId, PushLog
from adamserve.sessions.rounds import WorkersConfig
from adamserve_proto import algorithms as table

log = logging.getLogger("adamserve.sessions")

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_session_id(session_id: str) -> None:
    # fullmatch: with match and ``$`` an id ending in a newline would pass
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise ValueError(
            f"session id {shown(session_id)}: expected 1-128 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit")


@dataclass(frozen=True)
class SessionConfig:
    """Everything a create request fixes; it is also the checkpoint manifest's core."""

    algorithm: str
    tensors: tuple[TensorSpec, ...]
    groups: tuple[dict[str, Any], ...] = ({},)
    dtype: str = "float32"
    schedule: dict[str, Any] | None = None
    max_grad_norm: float | None = None
    clip_per_tensor: bool = False
    skip_nonfinite: bool = True
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    labels: dict[str, str] = field(default_factory=dict)
    tenant: str = ""  # the owner (sessions.names); "" the default tenant
    semantics: str = "torch"  # whose update rule and names: torch or optax
    state_dtype: str = ""  # the moments' precision; "": dtype's

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = [{"name": t.name, "shape": list(t.shape), "group": t.group}
                        for t in self.tensors]
        d["groups"] = [dict(g) for g in self.groups]
        d["workers"] = self.workers.to_json()
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> SessionConfig:
        return SessionConfig(
            algorithm=str(d["algorithm"]),
            tensors=tuple(TensorSpec(str(t["name"]), tuple(int(x) for x in t["shape"]),
                                     int(t.get("group", 0))) for t in d["tensors"]),
            groups=tuple(dict(g) for g in d["groups"]),
            dtype=str(d.get("dtype", "float32")),
            schedule=d.get("schedule"),
            max_grad_norm=d.get("max_grad_norm"),
            clip_per_tensor=bool(d.get("clip_per_tensor", False)),
            skip_nonfinite=bool(d.get("skip_nonfinite", True)),
            workers=WorkersConfig.from_json(d.get("workers")),
            labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
            tenant=str(d.get("tenant", "")),
            semantics=str(d.get("semantics", "torch")),
            state_dtype=str(d.get("state_dtype", "")),
        )

    @property
    def engine_algorithm(self) -> str:
        """The engine's name of the update rule (optax's aliases qualified)."""
        return table.qualified(self.algorithm, self.semantics)


# Bounds on declared shapes, shared by every transport: far beyond any device and far
# from int64 overflow in the layout's offsets and byte counts.
MAX_ELEMENTS = 1 << 40  # per session (and so per tensor and per dimension)
MAX_RANK = 32
MAX_TENSORS = 65536  # per session: every step's bookkeeping is per tensor
MAX_NAME = 1024  # characters of a tensor name (the HTTP schema reads it too)
# Bytes counted per tensor besides its elements (its name, spec, offsets, step count,
# index entry and a step's per-tensor arrays; measured ~300 for a short name), so that
# empty tensors are not free.
TENSOR_OVERHEAD = 512


def check_tensors(config: SessionConfig) -> None:
    """Count, names, shapes and the total size, checked without computing huge products
    (repeated names: :class:`Layout`, O(n))."""
    if not config.tensors:
        raise ValueError("a session needs at least one tensor")
    if len(config.tensors) > MAX_TENSORS:
        raise ValueError(f"{len(config.tensors)} tensors: a session holds at most "
                         f"{MAX_TENSORS} (MAX_TENSORS)")
    total = 0
    for t in config.tensors:
        if not isinstance(t.name, str) or not t.name:
            raise ValueError("tensor names must be non-empty strings")
        if len(t.name) > MAX_NAME:
            raise ValueError(f"tensor {shown(t.name)}: a name has at most {MAX_NAME} "
                             "characters")
        n = 1
        for d in t.shape:
            if d < 0:
                raise ValueError(f"tensor {shown(t.name)}: shape {shown(list(t.shape))} has a "
                                 "negative dimension")
            n = min(n * d, MAX_ELEMENTS + 1)
        total += n
        if total > MAX_ELEMENTS:
            raise ValueError(f"tensor {shown(t.name)}: the session would exceed "
                             f"{MAX_ELEMENTS} elements")


MAX_LABELS = 64


def check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"labels: {len(labels)} given; at most {MAX_LABELS}")
    for k, v in labels.items():
        if not 1 <= len(k) <= 128 or len(v) > 1024:
            raise ValueError(f"label {shown(k)}: expected a key of 1-128 characters and a "
                             "value of at most 1024")


def state_bytes(config: SessionConfig) -> int:
    """Bytes a session with this config holds (param, grad, slots, per-tensor overhead);
    it checks the tensors, repeated names too, before anything is allocated or locked."""
    check_tensors(config)
    layout = Layout(config.tensors)
    algo, extra = alg.parse_algorithm(config.engine_algorithm)
    spec = alg.SPECS[algo]
    slots: set[str] = set()
    for g in config.groups:
        slots.update(spec.slots(alg.resolve_hyperparameters(algo, {**extra, **g})))
    itemsize = 8 if config.dtype == "float64" else 4
    # a slot's size: the model's, but Adafactor's factored statistics (rows + columns)
    moments = sum(moment_bytes(config.state_dtype or config.dtype,
                               slot_offsets(algo, layout, s)) for s in slots)
    return slot_bytes(layout.size, 0, itemsize, len(layout)) + moments


def slot_bytes(elements: int, slots: int, itemsize: int, tensors: int = 0) -> int:
    """Bytes of param + grad + ``slots`` moment buffers of ``elements`` each, and the
    fixed overhead of ``tensors`` tensors."""
    return (2 + slots) * elements * itemsize + tensors * TENSOR_OVERHEAD


def build_optimizer(config: SessionConfig, backend: Backend) -> FlatOptimizer:
    """Validate ``config`` and allocate its state (raises ValueError on bad config)."""
    check_tensors(config)
    config.workers.check()
    check_labels(config.labels)
    norm = config.max_grad_norm
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, numbers.Real)
                             or not 0 < norm <= alg.MAX_VALUE):
        raise ValueError(f"max_grad_norm: expected a number in (0, {alg.MAX_VALUE:g}], got "
                         f"{shown(norm)}")
    schedule = schedules.schedule_from_dict(config.schedule) if config.schedule else None
    return FlatOptimizer(
        config.engine_algorithm,
        Layout(config.tensors),
        list(config.groups),
        backend=backend,
        dtype=config.dtype,
        state_dtype=config.state_dtype or None,
        schedule=schedule,
        clip=ClipConfig(config.max_grad_norm, config.clip_per_tensor),
        skip_nonfinite=config.skip_nonfinite,
    )


@dataclass
class Session:
    """One optimizer and everything kept beside it. It keeps its own invariants: a
    change of state goes through :meth:`changing` (or :meth:`record_step` for a step),
    which moves ``version`` on and wakes the waiters; :meth:`end` retires it."""

    id: str
    config: SessionConfig
    opt: FlatOptimizer
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the state
    # Serialises the use of the gradient buffer. A step holds it while it reads its
    # request from the network and only then takes ``lock``, so a slow client delays
    # the next step of its session but never a checkpoint, export or delete.
    intake: threading.Lock = field(default_factory=threading.Lock)
    created: float = field(default_factory=time.time)
    checkpointed_step: int = -1  # step of the last durable checkpoint
    checkpointed_at: float = field(default_factory=time.monotonic)
    version: int = 0  # moved on by every change of state: steps, imports, hyperparameters
    checkpointed_version: int = 0
    deleted: bool = False  # set under the lock; a waiter that finds it set gets NotFound
    restored_to: int | None = None  # replaced by its checkpoint of this step (deleted too)
    pushes: PushLog = field(default_factory=PushLog)  # exactly-once record, checkpointed
    # what runs after every applied step (the store installs its checkpoint trigger)
    on_step: Callable[[Session, StepReport], None] | None = None
    changed: threading.Condition = field(init=False)  # on ``lock``: rounds and steps
    # many workers; not checkpointed: a round lost to a restart is pushed again
    rounds: RoundCoordinator = field(init=False)
    # the recent steps, for the status page (in memory only: empty after a restart)
    history: History = field(default_factory=History)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)
        self.rounds = RoundCoordinator(self)

    @property
    def workers(self) -> WorkersConfig:
        return self.config.workers

    @property
    def round(self) -> Round | None:
        """The current round (open, or staged for its commit), if any."""
        return self.rounds.current

    # -- the one way to change a session (its lock held) -------------------------------

    @contextmanager
    def changing(self) -> Iterator[Session]:
        """A change of state: once the block succeeds the version moves on (so the
        session is dirty until checkpointed) and waiters wake; a block that raises
        counts as no change (a refused request changes nothing)."""
        yield self
        self.version += 1
        self.wake()

    def record_step(self, report: StepReport, pushes: Mapping[str, int]) -> None:
        """A step ran: counted; if applied (not skipped), its pushes (worker ->
        sequence; 0: none) go in the push log, the state changed, and the ``on_step``
        trigger runs."""
        metrics.STEPS.inc()
        self._note_step(report)
        if report.skipped:
            metrics.SKIPPED_STEPS.inc()
            return
        with self.changing():
            for worker, sequence in pushes.items():
                if sequence:
                    self.pushes.record(worker, sequence)
        if self.on_step is not None:
            self.on_step(self, report)

    def seen(self, push: PushId | None, base_step: int | None = None) -> bool:
        """Whether this push was applied before (raises if the log cannot take it).

        A push numbered by the step it is for (sequence = base_step + 1, as the client
        numbers the pushes of a named worker, so that a restarted worker goes on where
        the session is) may jump ahead of the worker's last one by the steps others made.
        """
        if push is None:
            return False
        if self.pushes.seen(push.worker, push.sequence):
            metrics.DUPLICATE_PUSHES.inc()
            return True
        if base_step is not None and push.sequence == base_step + 1:
            return False
        try:
            self.pushes.check(push.worker, push.sequence)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return False

    def wake(self) -> None:
        """Wake every request waiting on this session (a step, a round, its end)."""
        self._note_failed_round()
        self.changed.notify_all()

    # -- the history (never failing what it records) -----------------------------------

    def _note_step(self, report: StepReport) -> None:
        """Into the history: a step, and the round it ends if it ends one (the current
        round until its step is recorded: its outcome has the contributors and the
        missing, its start times it)."""
        try:
            r = self.rounds.current
            outcome = r.outcome if r is not None else None
            if outcome is None or r is None:
                self.history.record_step(report, self.opt)
                return
            self.history.record_step(report, self.opt, latency=time.monotonic() - r.started,
                                     contributors=outcome.contributors, missing=outcome.missing)
        except Exception:
            log.exception("session %s: step %d left out of its history", self.id, report.step)

    def _note_failed_round(self) -> None:
        """A round that failed wakes its waiters once it ended (every round ends through
        the coordinator's ``_end``, which wakes the session): into the history once."""
        r = self.rounds.ended
        if r is None or r.state is not RoundState.FAILED or r.id == self.history.failed_round:
            return
        try:
            self.history.failed_round = r.id
            error = r.outcome.error if r.outcome is not None else None
            missing = sorted(self.rounds.members - set(r.pushes))
            self.history.record(r.step, lrs_at(self.opt, r.step), None,
                                failed=error or "failed", latency=time.monotonic() - r.started,
                                contributors=r.arrived, missing=missing)
        except Exception:
            log.exception("session %s: failed round %d left out of its history", self.id, r.id)

    def end(self, restored_to: int | None = None) -> None:
        """Retire the session (deleted, or replaced by its checkpoint of ``restored_to``):
        whoever holds or waits for it gets NotFound (or, restored, Aborted)."""
        self.deleted = True
        self.restored_to = restored_to
        self.wake()

    def checkpointed(self, step: int, version: int) -> None:
        """A checkpoint of ``step``, taken at ``version``, is durable."""
        self.checkpointed_version = version
        self.checkpointed_step = step
        self.checkpointed_at = time.monotonic()

    @property
    def state_bytes(self) -> int:
        layout = self.opt.layout
        return (slot_bytes(layout.size, 0, self.opt.dtype.itemsize, len(layout))
                + self.opt.slot_bytes())

    @property
    def bytes_per_parameter(self) -> float:
        """Bytes of the master parameters and the moments per parameter (what the state
        costs a model, the gradient buffer and per-tensor overhead left out)."""
        n = self.opt.layout.size
        return (n * self.opt.dtype.itemsize + self.opt.slot_bytes()) / n if n else 0.0

    @property
    def dirty(self) -> bool:
        """Whether the state changed since the last checkpoint."""
        return self.version != self.checkpointed_version

    def fingerprint(self) -> str:
        """A hash of everything a step can change (for tests and for resume checks)."""
        import hashlib

        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.opt.backend.to_host(self.opt.param)).tobytes())
        for name in sorted(self.opt.slots):
            h.update(name.encode())
            for part, arr in sorted(self.opt.slot_native(name).items()):
                h.update(part.encode())
                h.update(arr.tobytes())
        h.update(self.opt.seg_step.tobytes())
        h.update(self.opt.mu_product.tobytes())
        h.update(str(self.opt.step_count).encode())
        h.update(repr(self.opt.groups).encode())
        return h.hexdigest()
