"""The two seams of the client: :class:`Wire` (one server, one wire) and
:class:`Transport` (the session operations an optimizer calls).

:class:`Wire` is the narrow one (like httpx's ``BaseTransport``): two methods that
move ``adamserve_proto.v2`` messages and tensor or blob payloads to one server and
back, :meth:`Wire.unary` and :meth:`Wire.stream`. A wire knows its protocol
(framing, routes, errors, retries) and nothing of what the messages mean:
:class:`~adamserve_client.transports.grpc.GrpcWire` and
:class:`~adamserve_client.transports.http.HttpWire` are the two.

:class:`Transport` is what :class:`~adamserve_client.RemoteOptimizer` calls: one
method per session operation, plain data in and out (the dataclasses below).
:class:`~adamserve_client.transports.client.Client` implements it once over any
wire; :class:`~adamserve_client.transports.sharded.ShardedTransport` over several
transports, one per shard.

Tensors cross both seams as :class:`WireTensor`: a name, a shape, an Open Inference
Protocol datatype (``FP32``, ``FP16``, ``BF16``, ``FP64``) and raw little-endian
bytes. Turning arrays into those bytes is the caller's business
(:mod:`adamserve_client.tensors`), so a transport never copies more than it must.

Same-host shared memory: a transport registers a region (:class:`RegionInfo`: a
POSIX shared-memory object the server maps) and a step names places in it
(:class:`RegionRef`) for its gradients and its returned parameters instead of
sending them (docs/shared-memory.md).

Errors are :mod:`adamserve_client.errors` exceptions carrying the server's message
and reason.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from google.protobuf.message import Message

from adamserve_client.tensors import Buffer

__all__ = [
    "Blob",
    "Buffer",
    "CheckpointInfo",
    "ExchangeSums",
    "HyperValue",
    "Hyperparameters",
    "RegionInfo",
    "RegionRef",
    "Reply",
    "RoundInfo",
    "Sender",
    "SessionInfo",
    "SessionSpec",
    "StateDict",
    "StepResult",
    "TensorSpec",
    "Transport",
    "Wire",
    "WireTensor",
    "Workers",
]

# A hyperparameter under torch.optim's name: a number, a switch, a tuple (``betas``), or a
# choice's name or None (Muon's ``adjust_lr_fn``).
HyperValue = float | bool | str | None | tuple[float | None, ...]
Hyperparameters = dict[str, HyperValue]
# torch.optim's state_dict layout with NumPy arrays: {"state": {index: {slot: array,
# "step": float}}, "param_groups": [{hyperparameters..., "params": [index...]}]}.
StateDict = dict[str, Any]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a session and the parameter group it belongs to."""

    name: str
    shape: tuple[int, ...]
    group: int = 0


@dataclass(frozen=True)
class WireTensor:
    """A whole tensor as raw little-endian bytes of ``datatype``, row-major; or, with
    ``rows`` (int64 little-endian row indices), those rows of it (slices along the
    first dim), ``data`` holding their values row after row (a row-sparse tensor)."""

    name: str
    shape: tuple[int, ...]
    datatype: str
    data: Buffer
    rows: Buffer | None = None


@dataclass(frozen=True)
class Workers:
    """How the pushes of a session's workers become steps.

    ``mode="sync"``: step t applies the mean of the gradients of ``count`` workers,
    each computed from the parameters of step t-1; a worker's step waits for the
    others. ``straggler_timeout`` (seconds, 0: none) fails a round that is not full
    in time (``straggler_policy="fail"``: :class:`~adamserve_client.errors.Aborted`,
    nothing applied) or applies the mean of what arrived (``"apply"``).
    ``mode="async"``: every push is applied on arrival; one computed more than
    ``max_staleness`` steps ago is refused; ``scale_lr_by_staleness`` scales lr by
    1 / (1 + staleness). ``exchange``: one shard of a sharded session (set by
    :class:`~adamserve_client.transports.sharded.ShardedTransport`).
    """

    count: int = 1
    mode: str = "sync"
    straggler_timeout: float = 0.0
    straggler_policy: str = "fail"
    max_staleness: int | None = None
    scale_lr_by_staleness: bool = False
    exchange: bool = False


@dataclass(frozen=True)
class SessionSpec:
    """Everything that defines a new session (the proto's SessionSpec)."""

    session_id: str
    algorithm: str
    tensors: tuple[TensorSpec, ...]
    groups: tuple[Hyperparameters, ...] = ({},)
    dtype: str = "float32"
    schedule: Mapping[str, Any] | None = None
    max_grad_norm: float | None = None
    clip_per_tensor: bool = False
    skip_nonfinite: bool = True
    workers: Workers = field(default_factory=Workers)
    labels: Mapping[str, str] = field(default_factory=dict)
    semantics: str = "torch"  # or "optax": optax's update rules and names
    state_dtype: str = ""  # the moments' precision ("bfloat16", "int8"); "": dtype's


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server describes it; ``groups`` use torch's names (betas a
    pair), ``schedule`` its ``{"kind": ...}`` form with every key, and
    ``checkpointed_step`` is -1 while the session has no checkpoint."""

    session_id: str
    algorithm: str
    dtype: str
    step: int
    tensors: tuple[TensorSpec, ...]
    groups: tuple[Hyperparameters, ...]
    lr: tuple[float, ...]
    schedule: dict[str, Any] | None
    max_grad_norm: float | None
    clip_per_tensor: bool
    skip_nonfinite: bool
    state_bytes: int
    checkpointed_step: int
    backend: str
    workers: Workers = field(default_factory=Workers)
    labels: Mapping[str, str] = field(default_factory=dict)
    tenant: str = ""  # the owner ("" the default tenant); an admin sees every tenant's
    semantics: str = "torch"
    state_dtype: str = "float32"  # the moments' precision
    moment_bytes: int = 0
    bytes_per_parameter: float = 0.0  # master parameters and moments, per parameter

    @property
    def numel(self) -> int:
        """The session's parameters."""
        return sum(math.prod(t.shape) for t in self.tensors)


@dataclass(frozen=True)
class RoundInfo:
    """What a push did in a session of several workers (the proto's RoundStatus)."""

    round_id: int = 0  # the round the push joined (sync), named by its commit
    contributors: int = 0  # sync: gradients averaged into the step
    missing: tuple[str, ...] = ()  # sync: workers absent from the step
    staleness: int = 0  # async: steps behind the push's base_step was


@dataclass(frozen=True)
class ExchangeSums:
    """The sums of squares one shard's staged step reports for its commit."""

    grad_sumsq: tuple[float, ...] = ()  # per tensor, of the (mean) gradient
    param_sumsq: tuple[float, ...] = ()  # LAMB, after the first commit
    update_sumsq: tuple[float, ...] = ()


@dataclass(frozen=True)
class StepResult:
    """The outcome of a step; ``params`` are every tensor's values (empty for a push).

    The parts of sessions of several workers are in ``workers`` (also read as
    ``round``, ``contributors``, ``missing`` and ``staleness``), those of one shard's
    two-phase step in ``exchange``.
    """

    step: int
    skipped: bool = False
    grad_norm: float | None = None
    nonfinite: tuple[str, ...] = ()
    params: tuple[WireTensor, ...] = ()
    duplicate: bool = False  # the sender's step was applied before: acknowledged only
    pending: bool = False  # in a round not applied yet, or staged for a commit
    workers: RoundInfo = field(default_factory=RoundInfo)
    exchange: ExchangeSums = field(default_factory=ExchangeSums)

    @property
    def round(self) -> int:
        return self.workers.round_id

    @property
    def contributors(self) -> int:
        return self.workers.contributors

    @property
    def missing(self) -> tuple[str, ...]:
        return self.workers.missing

    @property
    def staleness(self) -> int:
        return self.workers.staleness


@dataclass(frozen=True)
class Sender:
    """Who sends a step: the server applies each (worker, sequence) once, so a step
    whose answer was lost can be sent again safely."""

    worker: str
    sequence: int


@dataclass(frozen=True)
class RegionInfo:
    """A shared-memory region as registered: its ``name`` (what steps call it), the
    object's ``key`` (its name under /dev/shm) and the bytes the server maps."""

    name: str
    key: str
    byte_size: int


@dataclass(frozen=True)
class RegionRef:
    """A place in a registered region: ``byte_size`` bytes from ``offset``, holding a
    session's tensors packed in its order."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class CheckpointInfo:
    session_id: str
    step: int
    path: str
    bytes: int


# ---------------------------------------------------------------------------
# The per-server seam


@dataclass(frozen=True)
class Blob:
    """Raw bytes a stream carries instead of tensors (the state_dict blob)."""

    data: Buffer


# What a stream carries after its first message: tensors (chunked on the wire) or a blob.
Payload = Sequence[WireTensor] | Blob


@dataclass(frozen=True)
class Reply:
    """What a :meth:`Wire.stream` call answered: the response message (for a response
    stream, its one message that is not a chunk, e.g. a Step's ``StepStatus``; None
    when there was none) and the tensors or the blob bytes that came with it."""

    message: Message | None
    tensors: Sequence[WireTensor] = ()
    blob: Buffer = b""


class Wire(abc.ABC):
    """One server over one wire protocol: v2 messages and payloads, nothing more.

    Method names are the RPCs of ``adamserve_proto.v2.OptimizerService``
    (:data:`adamserve_proto.rpc.RPCS`). ``idempotent=False`` marks a call that must
    not run twice (a create, a step without a sender): the wire then retries it
    only where the request surely never reached the server. Failures are raised as
    :mod:`adamserve_client.errors` exceptions with the server's reason.
    """

    #: The server's URL as given to :func:`~adamserve_client.transports.connect`.
    url: str
    #: Seconds each call may take (None: no limit).
    timeout: float | None

    @abc.abstractmethod
    def unary(self, method: str, request: Message, *, idempotent: bool = True) -> Message:
        """One request message, one response message (e.g. ``GetSession``)."""

    @abc.abstractmethod
    def stream(self, method: str, request: Message, payload: Payload = (), *,
               idempotent: bool = True) -> Reply:
        """An RPC that moves tensors or blob bytes. ``request``: for a request stream
        its first message (e.g. a ``StepRequest`` with ``header`` set), else the
        request; ``payload``: the tensors (or the blob) the request stream carries
        after it, in the first message's chunk (or bytes) field."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the wire is unusable afterwards."""


# ---------------------------------------------------------------------------
# The operations seam


class Transport(abc.ABC):
    """The session operations on one server (or one sharded session's servers). Use as
    a context manager, or call close()."""

    #: The server's URL as given to :func:`~adamserve_client.transports.connect`.
    url: str

    @abc.abstractmethod
    def create_session(self, spec: SessionSpec,
                       initial: Sequence[WireTensor] = ()) -> SessionInfo:
        """Create a session; tensors without ``initial`` values start at zero."""

    @abc.abstractmethod
    def add_tensors(self, session_id: str, tensors: Sequence[TensorSpec],
                    group: Mapping[str, HyperValue] | None = None,
                    initial: Sequence[WireTensor] = ()) -> SessionInfo:
        """Grow a live session, as torch.optim's ``add_param_group``, atomically.

        ``tensors``: new names, appended after the session's. ``group``: the
        hyperparameters of a new parameter group (torch names; every new tensor's
        ``group`` must then be its index, the current number of groups); None: the
        tensors join existing groups. New tensors without ``initial`` values start at
        zero; their step counts start at 0. The rest of the session, its state and its
        checkpoints are kept; a refused call changes nothing.
        """

    @abc.abstractmethod
    def step(self, session_id: str, gradients: Sequence[WireTensor], *,
             return_datatype: str = "FP32", require_all: bool = False,
             sender: Sender | None = None, base_step: int | None = None,
             gradients_region: RegionRef | None = None, gradients_datatype: str = "FP32",
             params_region: RegionRef | None = None, return_rows: bool = False) -> StepResult:
        """One optimizer step; the result carries every tensor's parameters (with
        ``return_rows``, of a gradient sent row-sparse only the rows sent).

        ``base_step``: the step whose parameters the gradients were computed from (a
        synchronous session refuses a push for a step already applied; an async one
        bounds the staleness). In a synchronous session of several workers the call
        waits for the round and returns the parameters of that step.

        Shared memory: ``gradients_region`` holds every tensor's gradient, packed in
        the session's order, as ``gradients_datatype`` (``gradients`` then empty);
        ``params_region`` receives the parameters the same way, as
        ``return_datatype``, and the result carries none."""

    @abc.abstractmethod
    def push(self, session_id: str, gradients: Sequence[WireTensor], *,
             require_all: bool = False, sender: Sender | None = None,
             base_step: int | None = None, gradients_region: RegionRef | None = None,
             gradients_datatype: str = "FP32") -> StepResult:
        """One optimizer step with no parameters sent back (in a synchronous session
        of several workers: returns at once, ``pending`` until the round is applied);
        ``gradients_region`` as for :meth:`step`."""

    @abc.abstractmethod
    def register_shared_memory(self, name: str, key: str, byte_size: int) -> RegionInfo:
        """Have the server map ``byte_size`` bytes of the POSIX shared-memory object
        ``key`` (on the server's host: the same as this one) as the region ``name``.
        Registering the same again returns it; the server must allow shared memory
        (else FailedPrecondition, reason SHARED_MEMORY_DISABLED) and find the object
        (else NotFound, SHARED_MEMORY_NOT_FOUND: it runs on another host)."""

    @abc.abstractmethod
    def unregister_shared_memory(self, name: str) -> None:
        """Drop a region; a step using it finishes first."""

    @abc.abstractmethod
    def list_shared_memory(self) -> list[RegionInfo]:
        """The regions registered, ordered by name."""

    @abc.abstractmethod
    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             wait: float | None = None,
             rows: Mapping[str, Sequence[int] | np.ndarray] | None = None) -> list[WireTensor]:
        """Parameter values (all tensors when ``names`` is empty); with ``min_step``,
        once the session has reached that step (waiting up to ``wait`` seconds).
        ``rows``: only these rows of these tensors (row-sparse WireTensors), after the
        whole tensors of ``names`` (none when ``names`` is empty)."""

    @abc.abstractmethod
    def commit(self, session_id: str, step: int, tensor_sumsq: Sequence[float],
               total_sumsq: float, *, param_sumsq: Sequence[float] = (),
               update_sumsq: Sequence[float] = (), round_id: int = 0,
               return_datatype: str | None = "FP32") -> StepResult:
        """Apply the staged step of one shard with sums over every shard (the second
        phase of a sharded step; see :mod:`~adamserve_client.transports.exchange`);
        ``round_id``: the push answer's ``round``; ``return_datatype`` None: no
        parameters back. Safe to repeat."""

    @abc.abstractmethod
    def set_workers(self, session_id: str, count: int) -> SessionInfo:
        """Change the number of workers of a live session (workers joined or left)."""

    @abc.abstractmethod
    def list_checkpoints(self, session_id: str) -> list[int]:
        """Steps of the session's complete checkpoints, oldest first."""

    @abc.abstractmethod
    def restore_checkpoint(self, session_id: str, step: int) -> SessionInfo:
        """Roll the live session back to its checkpoint of ``step``."""

    @abc.abstractmethod
    def set_parameters(self, session_id: str, values: Sequence[WireTensor]) -> SessionInfo:
        """Overwrite the values of whole tensors (others keep theirs); the optimizer
        state and step count are kept. Safe to repeat."""

    @abc.abstractmethod
    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, HyperValue]) -> SessionInfo:
        """Change hyperparameters of one group (torch names; betas as a pair)."""

    @abc.abstractmethod
    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None) -> SessionInfo:
        """Replace (None: remove) the session's learning-rate schedule
        (``{"kind": "cosine", "total_steps": 100}``...)."""

    @abc.abstractmethod
    def export_state(self, session_id: str, native: bool = False) -> StateDict:
        """The optimizer state as a torch-format state_dict of NumPy arrays (``native``:
        the moments as the session stores them, ``exp_avg.codes`` and ``exp_avg.scale``
        or ``exp_avg.bf16`` for bfloat16 and int8 moments; :meth:`import_state` reads
        either)."""

    @abc.abstractmethod
    def import_state(self, session_id: str, state: Mapping[str, Any]) -> SessionInfo:
        """Replace the optimizer state from a torch-format state_dict of NumPy arrays."""

    @abc.abstractmethod
    def checkpoint(self, session_id: str) -> CheckpointInfo:
        """Write a durable checkpoint of the session now."""

    @abc.abstractmethod
    def describe(self, session_id: str) -> SessionInfo:
        """One session."""

    @abc.abstractmethod
    def list_sessions(self, *, page_size: int = 0) -> list[SessionInfo]:
        """Every live session, ordered by id, fetched ``page_size`` at a time (0: the
        server's default page)."""

    @abc.abstractmethod
    def delete_session(self, session_id: str) -> None:
        """Delete a session and its checkpoints."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the transport is unusable afterwards."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
