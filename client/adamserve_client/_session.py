"""The server session behind one optimizer: connecting, creating or attaching, keeping
it in step with the local hyperparameters, and numbering the steps.

:class:`Session` creates the session (or attaches to an existing one of that name,
after checking that it holds the same algorithm and tensors, and pulls its
parameters), chooses the master and wire dtypes, sends the hyperparameters changed
in ``param_groups`` since the last call, grows the session with a new parameter
group, and sends each step with this worker's name and sequence number and the
step its parameters are from (``base_step``), so the server applies each once and
the transport may resend a step whose answer was lost. With ``shared_memory`` a step
goes through a region on this host instead (:mod:`adamserve_client.shared_memory`),
and over the wire, after one warning, when the server cannot use one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from adamserve_client import errors, tensors
from adamserve_client._params import ROWS_UNCHANGED, LocalParams
from adamserve_client._torch import is_float64
from adamserve_client.shared_memory import SHM_DIR, StepRegion, refusal, wanted
from adamserve_client.transports import (
    SessionInfo,
    SessionSpec,
    StepResult,
    TensorSpec,
    Transport,
    WireTensor,
    connect,
)
from adamserve_client.transports.base import Hyperparameters, Sender, Workers
from adamserve_client.transports.sharded import ShardedTransport
from adamserve_proto.algorithms import ALGORITHMS, AlgorithmDef, wire_value
from adamserve_proto.convert import STATE_DTYPE

# the moments' precisions a session may keep (SessionSpec.state_dtype)
MOMENT_DTYPES = STATE_DTYPE.shorts

__all__ = ["DEFAULT_SERVER", "Server", "Session", "connect_server", "find_algorithm",
           "master_datatype"]

DEFAULT_SERVER = "grpc://127.0.0.1:50051"
# A step through shared memory refused for one of these reasons changed nothing: it goes
# over the wire instead (the server cannot use the region, or a sharded session's
# commits carry its parameters).
_WIRE_INSTEAD = frozenset({"SHARED_MEMORY_DISABLED", "SHARED_MEMORY_FORBIDDEN",
                           "SHARED_MEMORY_OUT_OF_RANGE", "SESSION_SHARDED"})
# A server URL, several (one sharded session across them, in shard order), or a transport.
Server = str | Sequence[str] | Transport | None


def find_algorithm(name: str) -> AlgorithmDef:
    """The table's row for an algorithm name (case-insensitive)."""
    key = name.strip().lower()
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of "
                         f"{', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[key]


def master_datatype(name: str) -> str:
    """The datatype of a ``master_dtype`` name: the server keeps float32 or float64."""
    key = name.lower()
    if key not in ("float32", "float64"):
        raise ValueError(f"master_dtype {name!r}: expected 'float32' or 'float64'")
    return tensors.WIRE_NAMES[key]


def connect_server(server: Server, token: str | None,
                   timeout: float | None) -> tuple[Transport, bool]:
    """The transport for ``server`` (see :class:`~adamserve_client.optim.RemoteOptimizer`)
    and whether the optimizer owns it (closes it when it is closed)."""
    if isinstance(server, Transport):
        return server, False
    if server is None and os.environ.get("ADAMSERVE_SHARDS"):
        server = [u for u in os.environ["ADAMSERVE_SHARDS"].split(",") if u.strip()]
    if server is not None and not isinstance(server, str) and len(server) == 1:
        server = server[0]
    auth = token if token is not None else os.environ.get("ADAMSERVE_TOKEN")
    if server is None or isinstance(server, str):
        url = server or os.environ.get("ADAMSERVE_URL") or DEFAULT_SERVER
        return connect(url, auth, timeout), True
    return ShardedTransport([connect(u, auth, timeout) for u in server]), True


def _delete_session(transport: Transport, session_id: str, close: bool) -> None:
    """Finalizer of an optimizer with an anonymous session: free the server's memory."""
    with contextlib.suppress(Exception):  # the server may be gone already
        transport.delete_session(session_id)
    if close:
        transport.close()


class Session:
    """One optimizer's server session. ``params``: the optimizer's parameters (the
    session's tensors); the ``groups`` each method takes are its ``param_groups``.

    ``wire_dtype`` / ``master_dtype``: the optimizer's arguments (None: follow the
    parameters, see :meth:`choose_dtypes`); ``workers``, ``worker_id`` and
    ``shared_memory`` likewise.
    """

    def __init__(self, transport: Transport, owns_transport: bool, algo: AlgorithmDef,
                 params: LocalParams, *, wire_dtype: str | None, master_dtype: str | None,
                 schedule: Mapping[str, Any] | None, workers: int | Workers | None,
                 worker_id: str | None, shared_memory: bool | None = None,
                 state_dtype: str | None = None) -> None:
        if state_dtype is not None and state_dtype not in MOMENT_DTYPES:
            raise ValueError(f"state_dtype {state_dtype!r}: expected one of "
                             f"{', '.join(map(repr, MOMENT_DTYPES))} (or None: the master "
                             "dtype's)")
        self.state_dtype = state_dtype
        # optax's rows are "optax.<alias>": the wire names the alias and the semantics
        semantics, dot, alias = algo.name.partition(".")
        self.semantics, self.wire_algorithm = (semantics, alias) if dot else ("torch", algo.runs)
        self.transport = transport
        self.owns_transport = owns_transport
        self.algo = algo
        self.params = params
        self._wire_choice = tensors.wire_datatype(wire_dtype) if wire_dtype else None
        self._master_choice = master_datatype(master_dtype) if master_dtype else None
        self.wire = self.master = "FP32"
        self.schedule = dict(schedule) if schedule is not None else None
        self._id: str | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        # the hyperparameters the server holds, per group, as last sent or read
        self.sent: list[Hyperparameters] = []
        # every step carries (worker, sequence): the server applies each once, so the
        # transport may resend a step whose answer was lost
        self.worker = worker_id or uuid.uuid4().hex
        self.sequence = 0
        self.workers = Workers(count=workers) if isinstance(workers, int) else workers
        self._count_only = isinstance(workers, int)  # workers=K says nothing of the rest
        # the step our parameters are from: sent with each push when several workers
        # share the session (a synchronous round refuses a push for a step already
        # applied; an async session bounds the staleness)
        self.base_step = 0
        # a named worker numbers its pushes by the step they are for, so that a restarted
        # worker goes on where the session is (a count from 1 would repeat old numbers,
        # which the server would take for resent pushes and drop)
        self.coordinated = self.workers is not None or worker_id is not None
        # same-host shared memory: wanted until a server refuses it; the region is made
        # at the first step (and again after the session grows)
        self.shared = wanted(shared_memory)
        self.region: StepRegion | None = None

    @property
    def id(self) -> str:
        """The server session's id."""
        if self._id is None:
            raise RuntimeError("the optimizer has no session yet")
        return self._id

    @property
    def opened(self) -> bool:
        return self._id is not None

    @property
    def synchronous(self) -> bool:
        """Whether every step waits for the other workers' pushes."""
        return self.coordinated and self.workers is not None and self.workers.count > 1

    def group_hyper(self, group: Mapping[str, Any]) -> Hyperparameters:
        """A group's hyperparameters that the server knows, as the wire takes them."""
        return {k: wire_value(k, group[k]) for k in sorted(self.algo.keys) if k in group}

    # -- creating or attaching ---------------------------------------------------------

    def _spec(self, session_id: str, groups: Sequence[Mapping[str, Any]]) -> SessionSpec:
        return SessionSpec(
            session_id=session_id, algorithm=self.wire_algorithm, semantics=self.semantics,
            state_dtype=self.state_dtype or "",
            tensors=tuple(TensorSpec(p.name, p.shape, p.group) for p in self.params),
            groups=tuple(self.group_hyper(g) for g in groups),
            dtype="float64" if self.master == "FP64" else "float32",
            schedule=self.schedule,
            workers=self.workers if self.workers is not None else Workers())

    def choose_dtypes(self, session_dtype: str | None = None) -> None:
        """The master dtype: an existing session's; else ``master_dtype``; else float64
        when every parameter is float64 (torch keeps their state in float64 too) or the
        wire is; else float32. The wire dtype: ``wire_dtype``, else the master's."""
        if session_dtype is not None:
            master = master_datatype(session_dtype)
            if self._master_choice not in (None, master):
                raise ValueError(f"the session keeps {session_dtype} master weights; this "
                                 f"optimizer asks for master_dtype "
                                 f"{'float64' if master == 'FP32' else 'float32'!r}")
        elif self._master_choice is not None:
            master = self._master_choice
        elif self._wire_choice == "FP64" or (
                len(self.params) and all(is_float64(p.value) for p in self.params)):
            master = "FP64"
        else:
            master = "FP32"
        self.master = master
        self.wire = self._wire_choice or master

    def open(self, name: str | None, groups: Sequence[Mapping[str, Any]], owner: object) -> None:
        """Attach to the session ``name`` if it exists, else create it (``None``: an
        anonymous one, deleted when ``owner`` is garbage-collected)."""
        t = self.transport
        session_id = name if name is not None else f"opt-{uuid.uuid4().hex[:20]}"
        info = None
        if name is not None:
            try:
                info = t.describe(name)
            except errors.NotFound:
                info = None
        if info is None:
            self.choose_dtypes()
            try:
                t.create_session(self._spec(session_id, groups),
                                 self.params.values(self.params.all, self.master))
                self.sent = [self.group_hyper(g) for g in groups]
                self.params.mark_synced(self.params)
            except errors.AlreadyExists:
                if name is None:
                    raise
                info = t.describe(name)
        if info is not None:
            self.choose_dtypes(info.dtype)
            self._attach(info, groups)
        self._id = session_id
        if name is None:
            self._finalizer = weakref.finalize(owner, _delete_session, t, session_id,
                                               self.owns_transport)

    def _attach(self, info: SessionInfo, groups: Sequence[Mapping[str, Any]]) -> None:
        """Resume an existing session: check it matches, then pull its parameters."""
        theirs = info.algorithm.strip().lower()
        if info.semantics != self.semantics or (
                self.semantics == "torch"
                and ALGORITHMS.get(theirs, find_algorithm(self.algo.runs)).runs != self.algo.runs
        ) or (self.semantics != "torch" and theirs != self.wire_algorithm):
            semantics = "" if info.semantics == "torch" else f" ({info.semantics} semantics)"
            raise ValueError(f"session {info.session_id!r} runs {info.algorithm}{semantics}; "
                             f"this optimizer is {self.algo.name}")
        if self.state_dtype is not None and info.state_dtype != self.state_dtype:
            raise ValueError(f"session {info.session_id!r} keeps {info.state_dtype} moments; "
                             f"this optimizer asks for state_dtype {self.state_dtype!r}")
        ours = [TensorSpec(p.name, p.shape, p.group) for p in self.params]
        if list(info.tensors) != ours or len(info.groups) != len(groups):
            def show(specs: Iterable[TensorSpec]) -> str:
                return ", ".join(f"{s.name} {list(s.shape)} (group {s.group})" for s in specs)

            raise ValueError(
                f"session {info.session_id!r} holds {len(info.tensors)} tensors in "
                f"{len(info.groups)} groups: {show(info.tensors)}; this optimizer has "
                f"{len(ours)} in {len(groups)} groups: {show(ours)}")
        self.params.write_all(self.transport.pull(info.session_id, datatype=self.master))
        self.sent = [{k: v for k, v in g.items() if k in self.algo.keys} for g in info.groups]
        self.base_step = info.step
        self.coordinated = (self.coordinated or info.workers.count > 1
                            or info.workers.mode == "async")
        self._match_workers(info)
        if self.schedule is not None and self.schedule != info.schedule:
            self.transport.set_schedule(info.session_id, self.schedule)

    def _match_workers(self, info: SessionInfo) -> None:
        """Attaching with ``workers=``: a new count (the job restarted with another world
        size) is set on the session; another mode or policy is an error."""
        if self.workers is None:
            return
        theirs = info.workers
        mine = dataclasses.replace(self.workers, exchange=theirs.exchange)
        if not self._count_only and dataclasses.replace(mine, count=theirs.count) != theirs:
            raise ValueError(f"session {info.session_id!r} runs workers {theirs}; this "
                             f"optimizer asks for {self.workers} (only the count may change "
                             "on a live session)")
        if mine.count != theirs.count:
            self.transport.set_workers(info.session_id, mine.count)

    def grow(self, groups: Sequence[Mapping[str, Any]], group: int) -> None:
        """Add group ``group`` and its parameters to the server session in one call:
        atomic on the server, which keeps the other tensors' weights and state and the
        session's checkpoints (a refused call changes nothing there)."""
        added = self.params.in_group(group)
        new = [TensorSpec(p.name, p.shape, p.group) for p in added]
        hyper = self.group_hyper(groups[group])
        values = self.params.values(added, self.master)
        try:
            self.transport.add_tensors(self.id, new, hyper, values)
        except (errors.DeadlineExceeded, errors.Unavailable, errors.ServerError):
            # the call may have been applied before it failed: if so, it succeeded
            if not self._grown(new, group):
                raise
        self.sent[group] = hyper
        self.params.mark_synced(added)
        self._drop_region()  # laid out for the tensors before: the next step makes one

    def _grown(self, new: Sequence[TensorSpec], group: int) -> bool:
        """Whether the session ends with exactly ``new`` and has ``group + 1`` groups."""
        try:
            info = self.transport.describe(self.id)
        except errors.AdamserveError:
            return False
        tail = list(info.tensors[len(info.tensors) - len(new):]) if new else []
        return (len(info.groups) == group + 1 and tail == list(new)
                and len(info.tensors) == len(self.params))

    # -- in step -----------------------------------------------------------------------

    def sync_hyperparameters(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """Send what changed in ``groups`` since the last call (schedulers write lr)."""
        for g, group in enumerate(groups):
            now = self.group_hyper(group)
            diff = {k: v for k, v in now.items() if self.sent[g].get(k) != v}
            if diff:
                self.transport.set_hyperparameters(self.id, g, diff)
                self.sent[g] = {**self.sent[g], **diff}

    def step(self, wire: list[WireTensor]) -> StepResult:
        """Send one step's gradients under the next sequence number; the server's answer
        (its ``params`` views of the shared-memory region, when the step went through
        one: valid until the next step)."""
        self.sequence = self.base_step + 1 if self.coordinated else self.sequence + 1
        region = self._region_for(wire)
        if region is not None:
            region.write_gradients(wire)
        while True:
            try:
                result = self._send(wire, region)
                break
            except errors.DeadlineExceeded:
                # no timeout of ours: the server ended a long wait for the other workers;
                # the same push again (recognised as such) waits on
                if not self.coordinated or getattr(self.transport, "timeout", 0) is not None:
                    raise
        self.base_step = result.step
        return result

    def _send(self, wire: list[WireTensor], region: StepRegion | None) -> StepResult:
        """The step, through ``region`` if given (registering it again once if the
        server forgot it), else, or if the server cannot use it, over the wire: a
        refusal of these reasons changed nothing, so the same step may go again."""
        kw: dict[str, Any] = {"return_datatype": self.wire,
                              "sender": Sender(self.worker, self.sequence),
                              "base_step": self.base_step if self.coordinated else None}
        if any(t.rows is not None for t in wire):
            # only the rows sent changed: only they come back (one worker: with several,
            # the others' rows changed too, and come back whole)
            kw["return_rows"] = self.algo.name in ROWS_UNCHANGED and not self.coordinated
        if region is None:
            return self.transport.step(self.id, wire, **kw)
        try:
            return self._through(region, kw)
        except errors.AdamserveError as exc:
            if exc.reason not in _WIRE_INSTEAD | {"SHARED_MEMORY_NOT_FOUND"}:
                raise
            refused = exc
        if refused.reason == "SHARED_MEMORY_NOT_FOUND":
            try:  # the server dropped the region (unused for a while) or restarted
                region.register(self.transport)
                return self._through(region, kw)
            except errors.AdamserveError as exc:
                if exc.reason not in _WIRE_INSTEAD | {"SHARED_MEMORY_NOT_FOUND"}:
                    raise
                refused = exc
        self._fall_back(refusal(refused, self.transport.url))
        return self.transport.step(self.id, wire, **kw)

    def _through(self, region: StepRegion, kw: dict[str, Any]) -> StepResult:
        result = self.transport.step(self.id, (), gradients_region=region.gradients,
                                     gradients_datatype=self.wire,
                                     params_region=region.params, **kw)
        return dataclasses.replace(result, params=region.parameters())

    def _region_for(self, wire: list[WireTensor]) -> StepRegion | None:
        """The region this step goes through (made and registered at the first one), or
        None: over the wire (shared memory off, or not every tensor has a gradient)."""
        if not self.shared or not wire or any(t.rows is not None for t in wire):
            return None  # a region holds every tensor dense
        if self.region is None:
            try:
                self.region = StepRegion(self.transport,
                                         [(p.name, p.shape) for p in self.params], self.wire)
            except OSError as exc:
                self._fall_back(f"this host has no usable {SHM_DIR} ({exc})")
                return None
            except (errors.Unavailable, errors.DeadlineExceeded):
                raise  # not an answer: the next step asks again
            except errors.AdamserveError as exc:  # the server's answer: it cannot use one
                self._fall_back(refusal(exc, self.transport.url))
                return None
        return self.region if self.region.covers(wire) else None

    def _fall_back(self, why: str) -> None:
        """Stop using shared memory, with one warning saying why."""
        self.shared = False
        self._drop_region()
        warnings.warn(f"adamserve: shared memory is not used, the steps go over the wire: "
                      f"{why}", RuntimeWarning, stacklevel=2)

    def _drop_region(self) -> None:
        region, self.region = self.region, None
        if region is not None:
            region.close(self.transport)

    def pull(self) -> None:
        """Overwrite the local parameters with the server's master weights."""
        info = self.transport.describe(self.id)
        self.params.write_all(self.transport.pull(self.id, datatype=self.master))
        self.base_step = info.step

    def restore_checkpoint(self, step: int | None = None) -> int:
        """Roll the session back to its checkpoint of ``step`` (default: the newest every
        shard holds) and pull its parameters; returns the step."""
        steps = self.transport.list_checkpoints(self.id)
        if step is None:
            if not steps:
                raise errors.FailedPrecondition(
                    f"session {self.id!r} has no complete checkpoint to restore")
            step = steps[-1]
        self.transport.restore_checkpoint(self.id, step)
        self.pull()
        return step

    def close(self, delete: bool | None = None) -> None:
        """Release the connection; ``delete`` the session (default: only an anonymous one)."""
        anonymous = self._finalizer is not None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._drop_region()
        if self._id is not None and (anonymous if delete is None else delete):
            with contextlib.suppress(errors.NotFound):
                self.transport.delete_session(self._id)
        if self.owns_transport:
            self.transport.close()
