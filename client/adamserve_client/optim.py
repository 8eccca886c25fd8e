"""Remote optimizers shaped like ``torch.optim``: the state lives on an adamserve server.

``torch.optim.AdamW(model.parameters(), lr=3e-4)`` becomes
``adamserve_client.AdamW(model.parameters(), lr=3e-4, server="grpc://host:50051")``;
the rest of a training loop (``zero_grad``, ``backward``, ``step``, LR schedulers,
``clip_grad_norm_``, ``state_dict``) keeps working.

How a step goes: the gradients of the parameters that have one (``.grad`` not
None, as torch skips the others) are sent in ``wire_dtype``; the server applies
one fused update to its master copy (float64 for a float64 model, else float32)
and sends the parameters back in ``wire_dtype``; they are copied into the
parameters in place. Hyperparameters changed in ``param_groups`` since the last
step (by hand or by an LR scheduler) are sent first, only the keys that changed,
and so are parameters changed locally since (``load_state_dict`` of the model, a
clamp, an EMA swap), found by their version counters: a step where nothing
changed costs nothing more.

With torch installed the classes are ``torch.optim.Optimizer`` subclasses (step
hooks, state-dict hooks and ``zero_grad`` come from torch). NumPy arrays work
as parameters too, with or without torch: they are updated in place by
``opt.step(grads)``.

State is the server's: ``opt.state[p]`` fetches it on first access after a step;
``state_dict()`` fetches it in torch's exact format and ``load_state_dict()`` sends
one (from this class or from ``torch.optim``) to the server.

:class:`RemoteOptimizer` composes three parts: the local parameters, their wire
encoding and change detection (``_params``), the server session, its dtypes and
step numbering (``_session``), and the state_dict translation (``_state_dict``).
The algorithms and every default come from ``adamserve_proto.algorithms``, the
table the server reads too.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from copy import deepcopy
from typing import TYPE_CHECKING, Any

import numpy as np

from adamserve_client import validation
from adamserve_client._optimizer_base import hooked_load, hooked_state_dict
from adamserve_client._params import LocalParams, Param, add_numpy_group
from adamserve_client._session import (
    DEFAULT_SERVER,
    Server,
    Session,
    connect_server,
    find_algorithm,
)
from adamserve_client._state_dict import (
    group_state,
    import_rows,
    match,
    merged_groups,
    packed_groups,
    server_state,
    with_params,
)
from adamserve_client._torch import HAVE_TORCH, is_tensor, torch
from adamserve_client.param_state import ParamState
from adamserve_client.transports import SessionInfo, StepResult, Transport
from adamserve_client.transports.base import StateDict, Workers
from adamserve_proto import algorithms as table

if TYPE_CHECKING:
    from torch.optim import Optimizer as _Base
else:
    try:
        from torch.optim import Optimizer as _Base
    except ImportError:  # NumPy mode only
        from adamserve_client._optimizer_base import OptimizerBase as _Base

__all__ = ["ALGORITHMS", "DEFAULT_SERVER", "HAVE_TORCH", "LAMB", "Adafactor", "Adagrad", "Adam",
           "AdamW",
           "AdamWScheduleFree", "Adamax", "Muon", "NAdam", "RAdam", "RAdamScheduleFree",
           "RMSprop", "RemoteOptimizer", "SparseAdam"]

# The algorithms and their defaults: the table both sides share.
ALGORITHMS = table.ALGORITHMS
# torch.optim group keys that pick an implementation, not the maths: kept in
# param_groups (so state_dicts look like torch's) and never sent.
TORCH_SWITCHES = frozenset(table.SWITCHES)


class RemoteOptimizer(_Base):
    """An optimizer whose state and update run on an adamserve server.

    ``params``: tensors or NumPy float arrays, ``(name, tensor)`` pairs (as from
    ``model.named_parameters()``: the names then name the session's tensors and
    are matched on ``load_state_dict``), or parameter-group dicts, as for torch.optim.
    ``algorithm``: adam, adamw, amsgrad, nadam, radam, adamax, adagrad, rmsprop,
    lamb, adafactor, muon, adamw_schedule_free or radam_schedule_free. ``hyperparameters``:
    the algorithm's, under torch.optim's names (schedulefree's for the last two).

    Keyword-only:

    ``server``: URL (``grpc://host:port``, ``http://host:port``), a list of them (a
    session sharded over those servers, in shard order) or a
    :class:`~adamserve_client.transports.Transport`; default ``$ADAMSERVE_SHARDS``
    (comma-separated URLs, as ``adamserve ray up`` prints), else ``$ADAMSERVE_URL``,
    else ``grpc://127.0.0.1:50051``.
    ``session``: a session name: attach to it (its parameters are pulled into
    ``params``: training resumes) when it exists, else create it. Without a name
    the session is anonymous and deleted by :meth:`close` or when the optimizer
    is garbage-collected.
    ``token``: the server's bearer token (default ``$ADAMSERVE_TOKEN``).
    ``wire_dtype``: "float32", "bfloat16", "float16" or "float64" for gradients and
    returned parameters (default: the master dtype).
    ``master_dtype``: "float32" or "float64", the dtype of the server's master weights
    and state (default: float64 when every parameter is float64 or ``wire_dtype`` is,
    as torch keeps a float64 model's state in float64; else float32).
    ``schedule``: a server-side learning-rate schedule (``{"kind": "cosine", ...}``);
    on attach, None leaves the session's schedule as it is.
    ``timeout``: seconds allowed for each server call (None: no limit).
    ``workers``: the session is shared by this many workers (an int: synchronous
    data parallelism, each step the mean of their gradients), or a
    :class:`~adamserve_client.transports.base.Workers` (asynchronous mode, straggler
    timeout, staleness bound); every worker passes the same ``session`` name. A
    list of URLs for ``server`` spreads the session over those shard servers.
    ``worker_id``: this worker's stable name (default: random per optimizer); with
    it, a restarted worker's resent steps are recognised as already applied.
    ``state_dtype``: the precision the server keeps the moments in: "bfloat16"
    (stochastic rounding) or "int8" (block-wise 8-bit, tensors of fewer than 4096
    elements in float32) for Adam, AdamW, AMSGrad, NAdam, RAdam, Adamax and LAMB with a
    float32 master; default (None) the master dtype. ``state_dict()`` exports the moments
    dequantised, as torch.optim holds them.
    ``semantics``: "torch" (default) or "optax": optax's update rule for adam, adamw,
    nadam, nadamw, radam, amsgrad, adamax, lamb and adafactor, with ``hyperparameters``
    under optax's names and defaults (``adamserve_client.optax``; docs/optax.md).
    ``shared_memory``: steps go through a POSIX shared-memory region on this host
    (gradients written into it, parameters read from it; no tensor bytes on the
    socket), on any transport, when the server runs here with
    ``--allow-shared-memory``; else they go over the wire after one warning saying
    why. A step where some parameter has no gradient goes over the wire. Default
    ``$ADAMSERVE_SHARED_MEMORY`` (``1`` to turn it on).
    """

    def __init__(self, params: Iterable[Any], algorithm: str, *,
                 server: Server = None, session: str | None = None,
                 token: str | None = None, wire_dtype: str | None = None,
                 master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None, timeout: float | None = None,
                 workers: int | Workers | None = None, worker_id: str | None = None,
                 shared_memory: bool | None = None, state_dtype: str | None = None,
                 semantics: str = "torch", **hyperparameters: Any) -> None:
        algo = find_algorithm(table.qualified(algorithm, semantics))
        unknown = sorted(set(hyperparameters) - algo.keys - TORCH_SWITCHES)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for "
                             f"{algorithm}; expected {', '.join(sorted(algo.keys))}")
        defaults = dict(hyperparameters)
        for key, value in algo.wire_defaults(extras=False).items():
            defaults.setdefault(key, value)
        validation.check_constructor(algo.name, defaults)
        # schedulefree's groups hold its switches (it reads foreach) and start with its state
        for key, value in algo.switch_defaults.items():
            defaults.setdefault(key, value)
        defaults.update(algo.group_state)
        # after the hyperparameters, as torch checks them
        if is_tensor(params):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {torch.typename(params)}")
        if isinstance(params, np.ndarray):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            "arrays or dicts, but got numpy.ndarray")
        self.algorithm = algo.name
        self._params = LocalParams(algo.name, type(self).__name__)
        self.last_step: StepResult | None = None
        transport, owns = connect_server(server, token, timeout)
        # wire and master dtypes follow the parameters unless given (Session.choose_dtypes)
        self._session = Session(transport, owns, algo, self._params, wire_dtype=wire_dtype,
                                master_dtype=master_dtype, schedule=schedule,
                                workers=workers, worker_id=worker_id,
                                shared_memory=shared_memory, state_dtype=state_dtype)
        try:
            super().__init__(params, defaults)
            self._params.groups = self.param_groups
            validation.check_params(algo.name, [p.value for p in self._params])
            # torch's defaultdict(dict), read from the server instead
            self.state = ParamState(  # type: ignore[assignment]
                lambda: [p.value for p in self._params], self._server_state)
            self._session.open(session, self.param_groups, owner=self)
        except BaseException:
            if owns:
                transport.close()
            raise

    @property
    def session_id(self) -> str:
        """The server session's id."""
        return self._session.id

    @property
    def transport(self) -> Transport:
        return self._session.transport

    # -- parameters --------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; after construction the server session grows with it."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group.get("params")
        if isinstance(params, np.ndarray) or is_tensor(params):
            listed: Any = [params]
        elif params is None or isinstance(params, set):
            listed = params  # torch's message for these
        else:
            listed = param_group["params"] = list(params)
        if isinstance(listed, list) and listed:
            self._params.set_mode(listed[0])
        if self._params.numpy:
            add_numpy_group(self.param_groups, self.defaults, param_group, self._params)
        else:
            super().add_param_group(param_group)
        g = len(self.param_groups) - 1
        start = len(self._params)
        sent = self._session.sent
        try:
            self._params.all.extend(self._params.new_group(g, self.param_groups[g]))
            self._invalidate_state()
            sent.append({})
            if self._session.opened:
                self._session.grow(self.param_groups, g)
        except BaseException:
            # leave the optimizer as it was before the call
            del self._params.all[start:]
            del sent[g:]
            del self.param_groups[g:]
            raise

    def _changed(self) -> list[Param]:
        """The parameters changed locally since the server's copy last matched."""
        return self._params.changed()

    def _send_changed(self) -> None:
        """Send the parameters changed locally since the last step, so the next step starts
        from what the user's tensors hold (as torch.optim's does); nothing when none did."""
        self._params.send_changed(self.transport, self.session_id, self._session.master)

    def params_changed(self, params: Iterable[Any] | None = None) -> None:
        """Say that ``params`` (default: all) were changed in a way the optimizer cannot
        see, so that the next step sends them first.

        torch parameters changed in place (``copy_``, ``clamp_`` under ``no_grad``,
        ``load_state_dict``, ``nn.init``) or given new storage are seen without this:
        their version counter or storage address changes. Changes through ``p.data``
        (``p.data.copy_(x)``) bypass the version counter, as they bypass autograd's
        checks, and NumPy arrays have none: call this after such changes.
        """
        self._params.mark_changed(params)

    # -- steps -------------------------------------------------------------------------

    def step(self, closure: Any = None, *, grads: Any = None) -> Any:
        """One optimizer step on the server; returns ``closure()``'s loss (or None).

        torch parameters: the gradients are their ``.grad`` (None: left alone). NumPy
        parameters: pass the gradients, ``opt.step(grads)`` with one array (or None)
        per parameter in order, or a dict by name.
        """
        validation.check_mode(self.algorithm, self.param_groups)
        if closure is not None and not callable(closure):
            closure, grads = None, closure
        loss = None
        if closure is not None:
            if torch is not None and not self._params.numpy:
                with torch.enable_grad():
                    loss = closure()
            else:
                loss = closure()
        session = self._session
        wire, sent = self._params.gradients(grads, session.wire)
        validation.check_step(self.algorithm, self.param_groups,
                              [p.value for p in sent.values()])
        if not wire:
            if session.synchronous:
                raise ValueError("no parameter has a gradient, but every worker of a "
                                 "synchronous session pushes every step (the others wait for "
                                 "it)")
            return loss
        session.sync_hyperparameters(self.param_groups)
        self._send_changed()
        result = session.step(wire)
        self._invalidate_state()
        with self._params.writing():
            for t in result.params:
                target = sent.get(t.name)
                if target is not None:
                    self._params.write(target, t)
        self._params.synchronize()
        self.last_step = dataclasses.replace(result, params=())
        if result.duplicate:
            warnings.warn(f"adamserve: the server had applied push {session.sequence} of "
                          f"worker {session.worker!r} before (a resend, or an earlier answer "
                          "was lost): if this call carried a new gradient, it was not "
                          f"applied; the parameters are now those of step {result.step}",
                          RuntimeWarning, stacklevel=3)
        if result.skipped:
            warnings.warn(f"adamserve skipped step {result.step + 1}: non-finite gradients in "
                          f"{', '.join(result.nonfinite)}", RuntimeWarning, stacklevel=3)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._params.numpy:
            return
        super().zero_grad(set_to_none)

    # -- state_dict --------------------------------------------------------------------

    def _server_state(self, exported: StateDict | None = None) -> dict[int, dict[str, Any]]:
        """Every parameter's state, by index, in torch's layout, fetched from the server
        (or read from its ``exported`` state)."""
        if exported is None:
            exported = self.transport.export_state(self.session_id)
        return server_state(self._params, self.param_groups, exported,
                            self._session.algo.runs, self._session.master)

    def _adopt_group_state(self, groups: Iterable[Mapping[str, Any]]) -> None:
        """The server's per-group state (schedulefree's ``k``, ``train_mode``, ...) into
        ``param_groups``; nothing for the algorithms that keep none."""
        for local, state in zip(self.param_groups, group_state(list(groups),
                                                               self._session.algo), strict=False):
            local.update(state)

    def state_dict(self) -> StateDict:
        """The optimizer state in torch.optim's format, fetched from the server (with the
        server's per-group state, which ``param_groups`` then holds too)."""
        def build() -> StateDict:
            exported = self.transport.export_state(self.session_id)
            self._adopt_group_state(exported["param_groups"])
            return {"state": self._server_state(exported),
                    "param_groups": packed_groups(self.param_groups)}

        return hooked_state_dict(self, build)

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a torch.optim-format state_dict (from this class or from torch.optim)
        into the server session, and its hyperparameters into ``param_groups``."""
        hooked_load(self, state_dict, self._load)

    def _load(self, sd: StateDict) -> None:
        saved_groups = deepcopy(list(sd["param_groups"]))
        id_map = match(self._params, self.param_groups, saved_groups)
        state = import_rows(self._params, sd["state"], id_map, self._session.algo)
        hyper = [self._session.group_hyper(g) for g in saved_groups]
        kept = group_state(saved_groups, self._session.algo)  # schedulefree's k, train_mode...
        info = self.transport.import_state(self.session_id, {
            "state": state, "param_groups": with_params(
                self._params, [{**h, **st} for h, st in zip(hyper, kept, strict=True)])})
        # the loaded state's step: the next push is for the next
        self._session.base_step = info.step
        self.param_groups = merged_groups(self.param_groups, saved_groups)
        self._params.groups = self.param_groups  # the list the sparse checks read
        self._session.sent = [dict(h) for h in hyper]
        self._invalidate_state()

    # -- the session, directly ---------------------------------------------------------

    def _invalidate_state(self) -> None:
        state = getattr(self, "state", None)
        if isinstance(state, ParamState):  # not yet while torch's __init__ runs
            state.invalidate()

    def describe(self) -> SessionInfo:
        """The server's view of the session (step count, lr per group, memory...), with
        the hyperparameters changed locally since the last step (by hand or by an LR
        scheduler) sent first, as the next step would."""
        self._session.sync_hyperparameters(self.param_groups)
        info = self.transport.describe(self.session_id)
        self._adopt_group_state(info.groups)
        return info

    def checkpoint(self) -> Any:
        """Write a durable checkpoint of the session on the server now, with the
        parameters and hyperparameters changed locally since the last step."""
        self._session.sync_hyperparameters(self.param_groups)
        self._send_changed()
        return self.transport.checkpoint(self.session_id)

    def set_schedule(self, schedule: Mapping[str, Any] | None) -> SessionInfo:
        """Replace (None: remove) the server-side learning-rate schedule."""
        self._session.schedule = dict(schedule) if schedule is not None else None
        return self.transport.set_schedule(self.session_id, schedule)

    def pull(self) -> None:
        """Overwrite the local parameters with the server's master weights."""
        self._session.pull()
        self._invalidate_state()

    def set_workers(self, count: int) -> SessionInfo:
        """Change how many workers share the session (workers joined or left)."""
        return self.transport.set_workers(self.session_id, count)

    def restore_checkpoint(self, step: int | None = None) -> int:
        """Roll the session back to its checkpoint of ``step`` (default: the newest; for a
        sharded session, the newest step every shard holds) and pull its parameters.
        Returns the step; the training loop resumes from there."""
        step = self._session.restore_checkpoint(step)
        self._invalidate_state()
        return step

    def close(self, delete: bool | None = None) -> None:
        """Release the connection; ``delete`` the session (default: only an anonymous one)."""
        self._session.close(delete)

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# torch.optim's classes, with torch's exact arguments; every default is the table's
# (adamserve_proto.algorithms), its switches' torch's (SWITCHES)

Params = Iterable[Any]
_Betas = tuple[float, float]
_SW = table.SWITCHES
_ADAM, _ADAMW, _NADAM, _RADAM, _ADAMAX, _ADAGRAD, _RMSPROP, _LAMB = (
    ALGORITHMS[name].defaults
    for name in ("adam", "adamw", "nadam", "radam", "adamax", "adagrad", "rmsprop", "lamb"))


class Adam(RemoteOptimizer):
    """``torch.optim.Adam`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = _ADAM["lr"],
                 betas: _Betas = _ADAM["betas"], eps: float = _ADAM["eps"],
                 weight_decay: float = _ADAM["weight_decay"], amsgrad: bool = _ADAM["amsgrad"],
                 *, foreach: bool | None = _SW["foreach"], maximize: bool = _ADAM["maximize"],
                 capturable: bool = _SW["capturable"],
                 differentiable: bool = _SW["differentiable"], fused: bool | None = _SW["fused"],
                 decoupled_weight_decay: bool = _ADAM["decoupled_weight_decay"],
                 server: Server = None, session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, "adam", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         state_dtype=state_dtype,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)


class AdamW(RemoteOptimizer):
    """``torch.optim.AdamW`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = _ADAMW["lr"],
                 betas: _Betas = _ADAMW["betas"], eps: float = _ADAMW["eps"],
                 weight_decay: float = _ADAMW["weight_decay"],
                 amsgrad: bool = _ADAMW["amsgrad"], *, maximize: bool = _ADAMW["maximize"],
                 foreach: bool | None = _SW["foreach"], capturable: bool = _SW["capturable"],
                 differentiable: bool = _SW["differentiable"], fused: bool | None = _SW["fused"],
                 server: Server = None, session: str | None = None,
                 token: str | None = None, wire_dtype: str | None = None,
                 master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, "adamw", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         state_dtype=state_dtype,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=_ADAMW["decoupled_weight_decay"])


class NAdam(RemoteOptimizer):
    """``torch.optim.NAdam`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = _NADAM["lr"],
                 betas: _Betas = _NADAM["betas"], eps: float = _NADAM["eps"],
                 weight_decay: float = _NADAM["weight_decay"],
                 momentum_decay: float = _NADAM["momentum_decay"],
                 decoupled_weight_decay: bool = _NADAM["decoupled_weight_decay"], *,
                 foreach: bool | None = _SW["foreach"], maximize: bool = _NADAM["maximize"],
                 capturable: bool = _SW["capturable"],
                 differentiable: bool = _SW["differentiable"], server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, "nadam", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         state_dtype=state_dtype,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         momentum_decay=momentum_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable)


class RAdam(RemoteOptimizer):
    """``torch.optim.RAdam`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = _RADAM["lr"],
                 betas: _Betas = _RADAM["betas"], eps: float = _RADAM["eps"],
                 weight_decay: float = _RADAM["weight_decay"],
                 decoupled_weight_decay: bool = _RADAM["decoupled_weight_decay"], *,
                 foreach: bool | None = _SW["foreach"], maximize: bool = _RADAM["maximize"],
                 capturable: bool = _SW["capturable"],
                 differentiable: bool = _SW["differentiable"], server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, "radam", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         state_dtype=state_dtype,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize, foreach=foreach, capturable=capturable,
                         decoupled_weight_decay=decoupled_weight_decay,
                         differentiable=differentiable)


class Adamax(RemoteOptimizer):
    """``torch.optim.Adamax`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = _ADAMAX["lr"],
                 betas: _Betas = _ADAMAX["betas"], eps: float = _ADAMAX["eps"],
                 weight_decay: float = _ADAMAX["weight_decay"],
                 foreach: bool | None = _SW["foreach"], *,
                 maximize: bool = _ADAMAX["maximize"],
                 differentiable: bool = _SW["differentiable"],
                 capturable: bool = _SW["capturable"], server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, "adamax", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         state_dtype=state_dtype,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=foreach, maximize=maximize, differentiable=differentiable,
                         capturable=capturable)


class Adagrad(RemoteOptimizer):
    """``torch.optim.Adagrad`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = _ADAGRAD["lr"],
                 lr_decay: float = _ADAGRAD["lr_decay"],
                 weight_decay: float = _ADAGRAD["weight_decay"],
                 initial_accumulator_value: float = _ADAGRAD["initial_accumulator_value"],
                 eps: float = _ADAGRAD["eps"], foreach: bool | None = _SW["foreach"], *,
                 maximize: bool = _ADAGRAD["maximize"],
                 differentiable: bool = _SW["differentiable"], fused: bool | None = _SW["fused"],
                 server: Server = None, session: str | None = None,
                 token: str | None = None, wire_dtype: str | None = None,
                 master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None) -> None:
        super().__init__(params, "adagrad", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value,
                         foreach=foreach, maximize=maximize, differentiable=differentiable,
                         fused=fused)


class RMSprop(RemoteOptimizer):
    """``torch.optim.RMSprop`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = _RMSPROP["lr"],
                 alpha: float = _RMSPROP["alpha"], eps: float = _RMSPROP["eps"],
                 weight_decay: float = _RMSPROP["weight_decay"],
                 momentum: float = _RMSPROP["momentum"], centered: bool = _RMSPROP["centered"],
                 capturable: bool = _SW["capturable"], foreach: bool | None = _SW["foreach"],
                 maximize: bool = _RMSPROP["maximize"],
                 differentiable: bool = _SW["differentiable"], *, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None) -> None:
        super().__init__(params, "rmsprop", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                         weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                         maximize=maximize, differentiable=differentiable)


class LAMB(RemoteOptimizer):
    """LAMB (You et al. 2019, as optax.lamb) on an adamserve server.

    torch has no LAMB; the defaults are optax.lamb's (the paper's), from the table
    in :mod:`adamserve_proto.algorithms`.
    """

    def __init__(self, params: Params, lr: float | Any = _LAMB["lr"],
                 betas: _Betas = _LAMB["betas"], eps: float = _LAMB["eps"],
                 weight_decay: float = _LAMB["weight_decay"], *,
                 maximize: bool = _LAMB["maximize"],
                 bias_correction: bool = _LAMB["bias_correction"], server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, "lamb", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         state_dtype=state_dtype,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize, bias_correction=bias_correction)


_MUON = ALGORITHMS["muon"].defaults


class Muon(RemoteOptimizer):
    """``torch.optim.Muon`` on an adamserve server (see :class:`RemoteOptimizer`).

    For 2-D parameters only, as torch's: give biases, norms and embeddings to a second
    optimizer (``AdamW``, on the same server), as torch's documentation does. The
    Newton-Schulz iteration runs in the master dtype (torch's in bfloat16, so the two
    differ by that rounding, about 3e-4 relative after 30 steps). ``ns_steps`` of 100
    or more is refused here, at construction (torch refuses it at the first step).
    """

    def __init__(self, params: Params, lr: float = _MUON["lr"],
                 weight_decay: float = _MUON["weight_decay"],
                 momentum: float = _MUON["momentum"], nesterov: bool = _MUON["nesterov"],
                 ns_coefficients: tuple[float, float, float] = _MUON["ns_coefficients"],
                 eps: float = _MUON["eps"], ns_steps: int = _MUON["ns_steps"],
                 adjust_lr_fn: str | None = _MUON["adjust_lr_fn"], *,
                 server: Server = None, session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None) -> None:
        super().__init__(params, "muon", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                         ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)


_SPARSE_ADAM = ALGORITHMS["sparse_adam"].defaults


class SparseAdam(RemoteOptimizer):
    """``torch.optim.SparseAdam`` on an adamserve server (see :class:`RemoteOptimizer`).

    Lazy, as torch's: a step changes only the rows its sparse gradients carry (their
    moments and values). Gradients must be sparse (``nn.Embedding(sparse=True)``); they
    go row-sparse, and only those rows of the parameters come back (docs/row-sparse.md).
    """

    def __init__(self, params: Params, lr: float | Any = _SPARSE_ADAM["lr"],
                 betas: tuple[float, float] = _SPARSE_ADAM["betas"],
                 eps: float = _SPARSE_ADAM["eps"], maximize: bool = _SPARSE_ADAM["maximize"],
                 *, server: Server = None, session: str | None = None,
                 token: str | None = None, wire_dtype: str | None = None,
                 master_dtype: str | None = None, schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None) -> None:
        super().__init__(params, "sparse_adam", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         lr=lr, betas=betas, eps=eps, maximize=maximize)


_ADAFACTOR = ALGORITHMS["adafactor"].defaults


class Adafactor(RemoteOptimizer):
    """``torch.optim.Adafactor`` on an adamserve server (see :class:`RemoteOptimizer`).

    A parameter of two dims or more keeps its second moment factored over its last two
    dims (``row_var`` and ``col_var``, torch's shapes: O(rows + cols) on the server);
    one of fewer keeps ``variance``. ``eps=(None, ...)``: eps1 is the machine epsilon of
    the master dtype (torch's: of the parameter's, the same unless ``master_dtype``
    differs from the model's). A sharded session keeps each parameter whole on one
    server (alpha and the update clipping are norms over the whole tensor).
    """

    def __init__(self, params: Params, lr: float | Any = _ADAFACTOR["lr"],
                 beta2_decay: float = _ADAFACTOR["beta2_decay"],
                 eps: tuple[float | None, float] = _ADAFACTOR["eps"],
                 d: float = _ADAFACTOR["d"], weight_decay: float = _ADAFACTOR["weight_decay"],
                 *, foreach: bool | None = _SW["foreach"],
                 maximize: bool = _ADAFACTOR["maximize"], server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None) -> None:
        super().__init__(params, "adafactor", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id, shared_memory=shared_memory,
                         lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                         weight_decay=weight_decay, foreach=foreach, maximize=maximize)


# ---------------------------------------------------------------------------
# facebookresearch's schedulefree (1.4.1), with its exact arguments; every default is
# the table's

_ADAMW_SF_ROW, _RADAM_SF_ROW = ALGORITHMS["adamw_schedule_free"], ALGORITHMS["radam_schedule_free"]
_ADAMW_SF, _RADAM_SF = _ADAMW_SF_ROW.defaults, _RADAM_SF_ROW.defaults


class _ScheduleFree(RemoteOptimizer):
    """schedulefree's ``train()`` and ``eval()``, on the server.

    The server keeps the package's per-group state (``k``, ``train_mode``,
    ``weight_sum``, ``lr_max``, ``scheduled_lr``); ``param_groups`` holds the server's
    values as of the last ``train()``, ``eval()``, ``state_dict()`` or ``describe()``
    (and of attaching to a named session). Like the package, the optimizer starts in
    eval mode (``train_mode`` false): call ``train()`` before the first step, ``eval()``
    before evaluating or saving the model. On a session shared by several workers the
    mode is the session's: one worker's ``train()`` switches it for all.
    A server-side ``schedule`` multiplies the lr before the warmup (AdamW) or
    rectification (RAdam), and its momentum cycling does not apply; leave it unset to
    match the package.
    """

    def __init__(self, params: Params, algorithm: str, *, session: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(params, algorithm, session=session, **kwargs)
        if session is not None:  # attached to a live session: its mode and step count
            self._adopt_group_state(self.transport.describe(self.session_id).groups)

    def train(self) -> None:
        """Switch to train mode: the parameters become the package's y (where the
        gradients are taken), for every group in eval mode."""
        self._switch(True)

    def eval(self) -> None:
        """Switch to eval mode: the parameters become the package's x (the average to
        evaluate and save), for every group in train mode."""
        self._switch(False)

    def _switch(self, train: bool) -> None:
        changing = [g for g, group in enumerate(self.param_groups)
                    if bool(group["train_mode"]) != train]
        if not changing:
            return
        # the swap starts from what the user's tensors and groups hold, as the package's
        self._session.sync_hyperparameters(self.param_groups)
        self._send_changed()
        info = None
        try:
            for g in changing:
                info = self.transport.set_hyperparameters(self.session_id, g,
                                                          {"train_mode": train})
                self.param_groups[g]["train_mode"] = train
        finally:
            if info is not None:
                self._adopt_group_state(info.groups)
                if info.step:  # before any step no tensor has a z: nothing moved
                    self.pull()


class AdamWScheduleFree(_ScheduleFree):
    """``schedulefree.AdamWScheduleFree`` on an adamserve server (see :class:`RemoteOptimizer`
    and ``_ScheduleFree``: ``train()``, ``eval()``)."""

    def __init__(self, params: Params, lr: float | Any = _ADAMW_SF["lr"],
                 betas: _Betas = _ADAMW_SF["betas"], eps: float = _ADAMW_SF["eps"],
                 weight_decay: float = _ADAMW_SF["weight_decay"],
                 warmup_steps: int = _ADAMW_SF["warmup_steps"], r: float = _ADAMW_SF["r"],
                 weight_lr_power: float = _ADAMW_SF["weight_lr_power"],
                 foreach: bool | None = _ADAMW_SF_ROW.switch_default("foreach"), *,
                 server: Server = None, session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None) -> None:
        super().__init__(params, "adamw_schedule_free", server=server, session=session,
                         token=token, wire_dtype=wire_dtype, master_dtype=master_dtype,
                         schedule=schedule, timeout=timeout, workers=workers,
                         worker_id=worker_id, shared_memory=shared_memory,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                         foreach=foreach)


class RAdamScheduleFree(_ScheduleFree):
    """``schedulefree.RAdamScheduleFree`` on an adamserve server (see :class:`RemoteOptimizer`
    and ``_ScheduleFree``: ``train()``, ``eval()``)."""

    def __init__(self, params: Params, lr: float | Any = _RADAM_SF["lr"],
                 betas: _Betas = _RADAM_SF["betas"], eps: float = _RADAM_SF["eps"],
                 weight_decay: float = _RADAM_SF["weight_decay"], r: float = _RADAM_SF["r"],
                 weight_lr_power: float = _RADAM_SF["weight_lr_power"],
                 foreach: bool | None = _RADAM_SF_ROW.switch_default("foreach"),
                 silent_sgd_phase: bool = _RADAM_SF["silent_sgd_phase"], *,
                 server: Server = None, session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None, shared_memory: bool | None = None) -> None:
        super().__init__(params, "radam_schedule_free", server=server, session=session,
                         token=token, wire_dtype=wire_dtype, master_dtype=master_dtype,
                         schedule=schedule, timeout=timeout, workers=workers,
                         worker_id=worker_id, shared_memory=shared_memory,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r,
                         weight_lr_power=weight_lr_power, foreach=foreach,
                         silent_sgd_phase=silent_sgd_phase)
