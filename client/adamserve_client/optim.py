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
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from adamserve_client import errors, tensors, validation
from adamserve_client.param_state import ParamState
from adamserve_client.transports import (
    SessionInfo,
    SessionSpec,
    StepResult,
    TensorSpec,
    Transport,
    WireTensor,
    connect,
)
from adamserve_client.transports._codec import SCALAR_SLOTS, hyper_value
from adamserve_client.transports.base import Hyperparameters, Sender, StateDict, Workers
from adamserve_client.transports.sharded import ShardedTransport

if TYPE_CHECKING:
    import torch
    from torch.optim import Optimizer as _Base
else:
    try:
        import torch
        from torch.optim import Optimizer as _Base
    except ImportError:  # NumPy mode only
        torch = None
        from adamserve_client._optimizer_base import OptimizerBase as _Base

__all__ = [
    "ALGORITHMS",
    "DEFAULT_SERVER",
    "LAMB",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "RMSprop",
    "RemoteOptimizer",
]

DEFAULT_SERVER = "grpc://127.0.0.1:50051"
# A server URL, several (one sharded session across them, in shard order), or a transport.
Server = str | Sequence[str] | Transport | None
HAVE_TORCH = torch is not None

# torch.optim group keys that pick an implementation, not the maths: kept in
# param_groups (so state_dicts look like torch's) and never sent.
TORCH_SWITCHES = frozenset({"foreach", "fused", "capturable", "differentiable"})


@dataclass(frozen=True)
class Algorithm:
    """What the client knows of one server algorithm.

    ``keys``: the hyperparameters the server accepts (torch's names, betas a pair);
    only these are ever sent. ``defaults``: torch.optim's defaults (LAMB: the
    paper's), used by the generic :class:`RemoteOptimizer`.
    """

    server: str
    keys: frozenset[str]
    defaults: Mapping[str, Any]


_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
         "maximize": False}
_ADAM_KEYS = frozenset(_ADAM) | {"amsgrad", "decoupled_weight_decay", "bias_correction"}

ALGORITHMS: dict[str, Algorithm] = {
    "adam": Algorithm("adam", _ADAM_KEYS, {**_ADAM, "amsgrad": False,
                                           "decoupled_weight_decay": False}),
    "amsgrad": Algorithm("adam", _ADAM_KEYS, {**_ADAM, "amsgrad": True,
                                              "decoupled_weight_decay": False}),
    "adamw": Algorithm("adamw", _ADAM_KEYS, {**_ADAM, "weight_decay": 1e-2, "amsgrad": False,
                                             "decoupled_weight_decay": True}),
    "nadam": Algorithm("nadam", frozenset(_ADAM) | {"momentum_decay", "decoupled_weight_decay"},
                       {**_ADAM, "lr": 2e-3, "momentum_decay": 4e-3,
                        "decoupled_weight_decay": False}),
    "radam": Algorithm("radam", frozenset(_ADAM) | {"decoupled_weight_decay"},
                       {**_ADAM, "decoupled_weight_decay": False}),
    "adamax": Algorithm("adamax", frozenset(_ADAM), {**_ADAM, "lr": 2e-3}),
    "adagrad": Algorithm(
        "adagrad",
        frozenset({"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps",
                   "maximize"}),
        {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
         "eps": 1e-10, "maximize": False}),
    "rmsprop": Algorithm(
        "rmsprop",
        frozenset({"lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"}),
        {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
         "centered": False, "maximize": False}),
    "lamb": Algorithm("lamb", frozenset(_ADAM) | {"bias_correction"},
                      {**_ADAM, "eps": 1e-6, "bias_correction": True}),
}

_TORCH_DTYPES: dict[str, Any] = {}
if torch is not None:
    _TORCH_DTYPES = {"FP32": torch.float32, "FP64": torch.float64, "FP16": torch.float16,
                     "BF16": torch.bfloat16}


# The order torch.optim creates state entries in (state_dicts compare equal regardless).
_SLOT_ORDER = {k: i for i, k in enumerate((
    "step", "mu_product", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "sum",
    "square_avg", "momentum_buffer", "grad_avg"))}


# torch.optim's messages for a sparse gradient (AdamW's is Adam's, its base class).
_SPARSE = {
    "adam": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "amsgrad": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "adamw": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "nadam": "NAdam does not support sparse gradients",
    "radam": "RAdam does not support sparse gradients",
    "adamax": "Adamax does not support sparse gradients",
    "rmsprop": "RMSprop does not support sparse gradients",
    # torch's Adagrad takes them; the server's does not yet
    "adagrad": "Adagrad here does not take sparse gradients: send grad.to_dense()",
}


def _algorithm(name: str) -> Algorithm:
    key = name.strip().lower()
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of "
                         f"{', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[key]


def _is_tensor(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _is_float64(x: Any) -> bool:
    return bool(x.dtype == torch.float64) if _is_tensor(x) else np.asarray(x).dtype == np.float64


def _master_datatype(name: str) -> str:
    """The datatype of a ``master_dtype`` name: the server keeps float32 or float64."""
    key = name.lower()
    if key not in ("float32", "float64"):
        raise ValueError(f"master_dtype {name!r}: expected 'float32' or 'float64'")
    return tensors.WIRE_NAMES[key]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def _scalar(value: Any) -> float:
    if _is_tensor(value):
        return float(value.item())
    return float(np.asarray(value).item())


def _to_numpy(value: Any) -> npt.NDArray[Any]:
    """A state tensor (torch or NumPy) as a host NumPy array the blob can hold."""
    if _is_tensor(value):
        t = value.detach().to("cpu")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
        return np.asarray(t.numpy())
    arr = np.asarray(value)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return arr


def _delete_session(transport: Transport, session_id: str, close: bool) -> None:
    """Finalizer of an optimizer with an anonymous session: free the server's memory."""
    with contextlib.suppress(Exception):  # the server may be gone already
        transport.delete_session(session_id)
    if close:
        transport.close()


@dataclass
class _Param:
    """One optimized tensor: its session name, group and the local array or tensor."""

    name: str
    group: int
    value: Any
    shape: tuple[int, ...]
    # what the value's stamp was when it last matched the server's copy (None: it may
    # not match; it is sent before the next step)
    synced: tuple[int, int] | None = None


def _stamp(value: Any) -> tuple[int, int]:
    """What changes when a torch tensor is changed in place (autograd's version counter:
    copy_, clamp_, load_state_dict, nn.init) or given other storage (``p.data = x``,
    ``.to(device)``). NumPy arrays carry neither: their stamp never changes, and
    :meth:`RemoteOptimizer.params_changed` says when they did."""
    if not _is_tensor(value):
        return (0, 0)
    try:
        return (int(value._version), int(value.data_ptr()))
    except RuntimeError:  # an inference tensor has no version counter: always send it
        return (-1, id(object()))


class RemoteOptimizer(_Base):
    """An optimizer whose state and update run on an adamserve server.

    ``params``: tensors or NumPy float arrays, ``(name, tensor)`` pairs (as from
    ``model.named_parameters()``: the names then name the session's tensors and
    are matched on ``load_state_dict``), or parameter-group dicts, as for torch.optim.
    ``algorithm``: adam, adamw, amsgrad, nadam, radam, adamax, adagrad, rmsprop or
    lamb. ``hyperparameters``: the algorithm's, under torch.optim's names.

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
    """

    def __init__(self, params: Iterable[Any], algorithm: str, *,
                 server: Server = None, session: str | None = None,
                 token: str | None = None, wire_dtype: str | None = None,
                 master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None, timeout: float | None = None,
                 workers: int | Workers | None = None, worker_id: str | None = None,
                 **hyperparameters: Any) -> None:
        algo = _algorithm(algorithm)
        unknown = sorted(set(hyperparameters) - algo.keys - TORCH_SWITCHES)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for "
                             f"{algorithm}; expected {', '.join(sorted(algo.keys))}")
        defaults = dict(hyperparameters)
        for key, value in algo.defaults.items():
            defaults.setdefault(key, value)
        validation.check_constructor(algorithm.strip().lower(), defaults)
        # after the hyperparameters, as torch checks them
        if _is_tensor(params):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {torch.typename(params)}")
        if isinstance(params, np.ndarray):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            "arrays or dicts, but got numpy.ndarray")
        self.algorithm = algorithm.strip().lower()
        self._algo = algo
        # both follow the parameters unless given (see _choose_dtypes)
        self._wire_choice = tensors.wire_datatype(wire_dtype) if wire_dtype else None
        self._master_choice = _master_datatype(master_dtype) if master_dtype else None
        self._wire = self._master = "FP32"
        self._schedule = dict(schedule) if schedule is not None else None
        self._params: list[_Param] = []
        self._numpy: bool | None = None
        self._sent: list[Hyperparameters] = []
        self._session_id: str | None = None
        self._pinned: dict[tuple[str, str], Any] = {}
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.last_step: StepResult | None = None
        # every step carries (worker, sequence): the server applies each once, so the
        # transport may resend a step whose answer was lost
        self._worker = worker_id or uuid.uuid4().hex
        self._sequence = 0
        self._workers = Workers(count=workers) if isinstance(workers, int) else workers
        self._count_only = isinstance(workers, int)  # workers=K says nothing of the rest
        # the step our parameters are from: sent with each push when several workers
        # share the session (a synchronous round refuses a push for a step already
        # applied; an async session bounds the staleness)
        self._base_step = 0
        # a named worker numbers its pushes by the step they are for, so that a restarted
        # worker goes on where the session is (a count from 1 would repeat old numbers,
        # which the server would take for resent pushes and drop)
        self._coordinated = self._workers is not None or worker_id is not None
        if isinstance(server, Transport):
            self._transport = server
            self._owns_transport = False
        else:
            if server is None and os.environ.get("ADAMSERVE_SHARDS"):
                server = [u for u in os.environ["ADAMSERVE_SHARDS"].split(",") if u.strip()]
            if server is not None and not isinstance(server, str) and len(server) == 1:
                server = server[0]
            auth = token if token is not None else os.environ.get("ADAMSERVE_TOKEN")
            if server is None or isinstance(server, str):
                url = server or os.environ.get("ADAMSERVE_URL") or DEFAULT_SERVER
                self._transport = connect(url, auth, timeout)
            else:
                self._transport = ShardedTransport([connect(u, auth, timeout) for u in server])
            self._owns_transport = True
        try:
            super().__init__(params, defaults)
            # torch's defaultdict(dict), read from the server instead
            self.state = ParamState(  # type: ignore[assignment]
                lambda: [p.value for p in self._params], self._server_state)
            self._open_session(session)
        except BaseException:
            if self._owns_transport:
                self._transport.close()
            raise

    # -- parameters ----------------------------------------------------------------

    @property
    def session_id(self) -> str:
        """The server session's id."""
        if self._session_id is None:
            raise RuntimeError("the optimizer has no session yet")
        return self._session_id

    @property
    def transport(self) -> Transport:
        return self._transport

    def _set_mode(self, first: Any) -> None:
        value = first[1] if isinstance(first, tuple) else first
        numpy = isinstance(value, np.ndarray)
        if not numpy and not _is_tensor(value):
            raise TypeError("optimizer can only optimize torch Tensors or NumPy float arrays, "
                            f"but one of the params is {type(value).__name__}")
        if self._numpy is None:
            self._numpy = numpy
        elif self._numpy != numpy:
            raise TypeError("optimizer parameters must be all torch Tensors or all NumPy arrays")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; after construction the server session grows with it."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group.get("params")
        if isinstance(params, np.ndarray) or _is_tensor(params):
            listed: Any = [params]
        elif params is None or isinstance(params, set):
            listed = params  # torch's message for these
        else:
            listed = param_group["params"] = list(params)
        if isinstance(listed, list) and listed:
            self._set_mode(listed[0])
        if self._numpy:
            self._add_numpy_group(param_group)
        else:
            super().add_param_group(param_group)
        g = len(self.param_groups) - 1
        start = len(self._params)
        try:
            self._params.extend(self._new_params(g))
            self._invalidate_state()
            self._sent.append({})
            if self._session_id is not None:
                self._grow_session(g)
        except BaseException:
            # leave the optimizer as it was before the call
            del self._params[start:]
            del self._sent[g:]
            del self.param_groups[g:]
            raise

    def _new_params(self, g: int) -> list[_Param]:
        """The parameters of group ``g``, named and checked."""
        group = self.param_groups[g]
        names = group.get("param_names")
        start = len(self._params)
        taken = {p.name for p in self._params}
        values = {id(p.value) for p in self._params}
        added = []
        for k, value in enumerate(group["params"]):
            self._set_mode(value)
            if _is_tensor(value) and not value.is_floating_point():
                raise TypeError(f"parameter {k} of group {g} has dtype {value.dtype}; the "
                                "optimizer needs floating-point parameters")
            name = str(names[k]) if names else f"param.{start + k}"
            if id(value) in values:
                # torch warns and updates it twice per step, a behaviour it deprecates
                raise ValueError(f"parameter {k} of group {g} appears in the optimizer more "
                                 "than once (torch warns that this will become an error): "
                                 "list each parameter once")
            if name in taken:
                raise ValueError(f"parameter name {name!r} appears twice")
            taken.add(name)
            values.add(id(value))
            added.append(_Param(name, g, value, _shape(value)))
        return added

    def _add_numpy_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, for NumPy arrays."""
        params = param_group["params"]
        if isinstance(params, np.ndarray):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections")
        arrays, names = [], []
        for p in params:
            if isinstance(p, tuple):
                names.append(str(p[0]))
                p = p[1]
            self._set_mode(p)
            if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
                raise TypeError("NumPy mode optimizes NumPy float arrays, but one of the "
                                f"params is {type(p).__name__}"
                                + (f" of dtype {p.dtype}" if isinstance(p, np.ndarray) else ""))
            if not p.flags.writeable:
                raise ValueError("a parameter array is read-only; it must be updated in place")
            arrays.append(p)
        param_group["params"] = arrays
        if names:
            if len(names) != len(arrays):
                raise ValueError("all optimizer params should be with/without names. Some "
                                 "param names are missing")
            param_group["param_names"] = names
        for key, default in self.defaults.items():
            param_group.setdefault(key, default)
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for group in self.param_groups:
            if ("param_names" in group) != ("param_names" in param_group):
                raise ValueError("all optimizer param groups should be with/without names")
        if seen & {id(p) for p in arrays}:
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(param_group)

    def _group_hyper(self, group: Mapping[str, Any]) -> Hyperparameters:
        """A group's hyperparameters that the server knows, as the wire takes them."""
        return {k: hyper_value(k, group[k]) for k in sorted(self._algo.keys) if k in group}

    # -- tensors on the wire -----------------------------------------------------------

    def _host_tensor(self, p: _Param, x: Any, datatype: str, key: str) -> Any:
        """``x`` (torch) as a contiguous CPU tensor of ``datatype``; CUDA goes through a
        pinned host buffer that is reused across steps."""
        dtype = _TORCH_DTYPES[datatype]
        x = x.detach()
        if x.device.type == "cpu":
            return x.to(dtype).contiguous()
        buf = self._pinned_buffer(p, dtype, key)
        buf.copy_(x.to(dtype), non_blocking=True)
        return buf

    def _pinned_buffer(self, p: _Param, dtype: Any, key: str) -> Any:
        """A page-locked host tensor shaped like ``p``, kept for the next steps."""
        buf = self._pinned.get((p.name, key))
        if buf is None or buf.dtype != dtype or _shape(buf) != p.shape:
            buf = torch.empty(p.shape, dtype=dtype, pin_memory=True)
            self._pinned[(p.name, key)] = buf
        return buf

    def _encode(self, p: _Param, x: Any, datatype: str, key: str) -> WireTensor:
        if isinstance(x, np.ndarray) or not _is_tensor(x):
            arr = np.asarray(x)
            if _shape(arr) != p.shape:
                raise ValueError(f"gradient for {p.name!r} has shape {list(arr.shape)}, the "
                                 f"parameter has shape {list(p.shape)}")
            return WireTensor(p.name, p.shape, datatype, tensors.encode(arr, datatype))
        if _shape(x) != p.shape:
            raise ValueError(f"gradient for {p.name!r} has shape {list(x.shape)}, the "
                             f"parameter has shape {list(p.shape)}")
        if x.is_sparse:
            raise RuntimeError(_SPARSE.get(self.algorithm, f"{type(self).__name__} does not "
                                           "support sparse gradients"))
        host = self._host_tensor(p, x, datatype, key)
        data = memoryview(host.reshape(-1).view(torch.uint8).numpy()) if host.numel() else b""
        return WireTensor(p.name, p.shape, datatype, data)

    def _synchronize(self) -> None:
        if self._pinned and torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()

    def _write(self, p: _Param, t: WireTensor) -> None:
        """Copy a tensor from the server into the parameter, in place."""
        if t.shape != p.shape:
            raise errors.ServerError(f"server sent {t.name!r} with shape {list(t.shape)}, the "
                                     f"parameter has shape {list(p.shape)}")
        if not _is_tensor(p.value):
            tensors.decode_into(p.value, t.data, t.datatype)
            p.synced = _stamp(p.value)
            return
        if not len(memoryview(t.data)):
            p.synced = _stamp(p.value)
            return
        with warnings.catch_warnings():
            # torch warns that a bytes object is not writable; it is only read here
            warnings.simplefilter("ignore")
            src = torch.frombuffer(t.data, dtype=_TORCH_DTYPES[t.datatype]).view(p.shape)
        value = p.value
        with torch.no_grad():
            if value.device.type == "cpu":
                value.copy_(src)
            else:
                # bytes -> pinned host buffer -> device, asynchronously; step() waits
                # for the copies before the buffer is written again
                staged = self._pinned_buffer(p, src.dtype, "param")
                staged.copy_(src)
                value.copy_(staged, non_blocking=True)
        p.synced = _stamp(value)  # after our own in-place write

    def _values(self, params: Sequence[_Param], datatype: str) -> list[WireTensor]:
        out = [self._encode(p, p.value, datatype, "value") for p in params]
        self._synchronize()
        return out

    # -- parameters changed locally ------------------------------------------------------

    @staticmethod
    def _mark_synced(params: Iterable[_Param]) -> None:
        for p in params:
            p.synced = _stamp(p.value)

    def _changed(self) -> list[_Param]:
        """The parameters whose local values may differ from the server's copy: changed
        in place or rebound since we last wrote or sent them, or marked by
        :meth:`params_changed`. Costs two attribute reads per parameter."""
        changed = [p for p in self._params if p.synced != _stamp(p.value)]
        for p in changed:
            if _shape(p.value) != p.shape:
                raise ValueError(f"parameter {p.name!r} now has shape {list(p.value.shape)}, "
                                 f"but the session holds it as {list(p.shape)}: a tensor keeps "
                                 "its shape (build a new optimizer for the new model)")
        return changed

    def _send_changed(self) -> None:
        """Send the parameters changed locally since the last step, so the next step starts
        from what the user's tensors hold (as torch.optim's does); nothing when none did."""
        changed = self._changed()
        if changed:
            self._transport.set_parameters(self.session_id, self._values(changed, self._master))
            self._mark_synced(changed)

    def params_changed(self, params: Iterable[Any] | None = None) -> None:
        """Say that ``params`` (default: all) were changed in a way the optimizer cannot
        see, so that the next step sends them first.

        torch parameters changed in place (``copy_``, ``clamp_`` under ``no_grad``,
        ``load_state_dict``, ``nn.init``) or given new storage are seen without this:
        their version counter or storage address changes. Changes through ``p.data``
        (``p.data.copy_(x)``) bypass the version counter, as they bypass autograd's
        checks, and NumPy arrays have none: call this after such changes.
        """
        if params is None:
            marked = self._params
        else:
            ids = {id(x[1] if isinstance(x, tuple) else x) for x in params}
            marked = [p for p in self._params if id(p.value) in ids]
            if len(marked) != len(ids):
                raise ValueError("params_changed: some of the given tensors are not "
                                 "parameters of this optimizer")
        for p in marked:
            p.synced = None

    # -- the session -------------------------------------------------------------------

    def _spec(self, session_id: str) -> SessionSpec:
        return SessionSpec(
            session_id=session_id, algorithm=self._algo.server,
            tensors=tuple(TensorSpec(p.name, p.shape, p.group) for p in self._params),
            groups=tuple(self._group_hyper(g) for g in self.param_groups),
            dtype="float64" if self._master == "FP64" else "float32",
            schedule=self._schedule,
            workers=self._workers if self._workers is not None else Workers())

    def _choose_dtypes(self, session_dtype: str | None = None) -> None:
        """The master dtype: an existing session's; else ``master_dtype``; else float64
        when every parameter is float64 (torch keeps their state in float64 too) or the
        wire is; else float32. The wire dtype: ``wire_dtype``, else the master's."""
        if session_dtype is not None:
            master = _master_datatype(session_dtype)
            if self._master_choice not in (None, master):
                raise ValueError(f"the session keeps {session_dtype} master weights; this "
                                 f"optimizer asks for master_dtype "
                                 f"{'float64' if master == 'FP32' else 'float32'!r}")
        elif self._master_choice is not None:
            master = self._master_choice
        elif self._wire_choice == "FP64" or (
                self._params and all(_is_float64(p.value) for p in self._params)):
            master = "FP64"
        else:
            master = "FP32"
        self._master = master
        self._wire = self._wire_choice or master

    def _open_session(self, name: str | None) -> None:
        t = self._transport
        session_id = name if name is not None else f"opt-{uuid.uuid4().hex[:20]}"
        info = None
        if name is not None:
            try:
                info = t.describe(name)
            except errors.NotFound:
                info = None
        if info is None:
            self._choose_dtypes()
            try:
                t.create_session(self._spec(session_id), self._values(self._params, self._master))
                self._sent = [self._group_hyper(g) for g in self.param_groups]
                self._mark_synced(self._params)
            except errors.AlreadyExists:
                if name is None:
                    raise
                info = t.describe(name)
        if info is not None:
            self._choose_dtypes(info.dtype)
            self._attach(info)
        self._session_id = session_id
        if name is None:
            self._finalizer = weakref.finalize(self, _delete_session, t, session_id,
                                               self._owns_transport)

    def _attach(self, info: SessionInfo) -> None:
        """Resume an existing session: check it matches, then pull its parameters."""
        theirs = info.algorithm.strip().lower()
        if ALGORITHMS.get(theirs, _algorithm(self._algo.server)).server != self._algo.server:
            raise ValueError(f"session {info.session_id!r} runs {info.algorithm}; this "
                             f"optimizer is {self.algorithm}")
        ours = [TensorSpec(p.name, p.shape, p.group) for p in self._params]
        if list(info.tensors) != ours or len(info.groups) != len(self.param_groups):
            def show(specs: Iterable[TensorSpec]) -> str:
                return ", ".join(f"{s.name} {list(s.shape)} (group {s.group})" for s in specs)

            raise ValueError(
                f"session {info.session_id!r} holds {len(info.tensors)} tensors in "
                f"{len(info.groups)} groups: {show(info.tensors)}; this optimizer has "
                f"{len(ours)} in {len(self.param_groups)} groups: {show(ours)}")
        by_name = {p.name: p for p in self._params}
        for t in self._transport.pull(info.session_id, datatype=self._master):
            self._write(by_name[t.name], t)
        self._synchronize()
        self._sent = [{k: v for k, v in g.items() if k in self._algo.keys} for g in info.groups]
        self._base_step = info.step
        self._coordinated = (self._coordinated or info.workers.count > 1
                             or info.workers.mode == "async")
        self._match_workers(info)
        if self._schedule is not None and self._schedule != info.schedule:
            self._transport.set_schedule(info.session_id, self._schedule)

    def _match_workers(self, info: SessionInfo) -> None:
        """Attaching with ``workers=``: a new count (the job restarted with another world
        size) is set on the session; another mode or policy is an error."""
        if self._workers is None:
            return
        theirs = info.workers
        mine = dataclasses.replace(self._workers, exchange=theirs.exchange)
        if not self._count_only and dataclasses.replace(mine, count=theirs.count) != theirs:
            raise ValueError(f"session {info.session_id!r} runs workers {theirs}; this "
                             f"optimizer asks for {self._workers} (only the count may change "
                             "on a live session)")
        if mine.count != theirs.count:
            self._transport.set_workers(info.session_id, mine.count)

    def _grow_session(self, group: int) -> None:
        """Add group ``group`` and its parameters to the server session in one call:
        atomic on the server, which keeps the other tensors' weights and state and the
        session's checkpoints (a refused call changes nothing there)."""
        new = [TensorSpec(p.name, p.shape, p.group) for p in self._params if p.group == group]
        hyper = self._group_hyper(self.param_groups[group])
        added = [p for p in self._params if p.group == group]
        values = self._values(added, self._master)
        try:
            self._transport.add_tensors(self.session_id, new, hyper, values)
        except (errors.DeadlineExceeded, errors.Unavailable, errors.ServerError):
            # the call may have been applied before it failed: if so, it succeeded
            if not self._session_grown(new, group):
                raise
        self._sent[group] = hyper
        self._mark_synced(added)

    def _session_grown(self, new: Sequence[TensorSpec], group: int) -> bool:
        """Whether the session ends with exactly ``new`` and has ``group + 1`` groups."""
        try:
            info = self._transport.describe(self.session_id)
        except errors.AdamserveError:
            return False
        tail = list(info.tensors[len(info.tensors) - len(new):]) if new else []
        return (len(info.groups) == group + 1 and tail == list(new)
                and len(info.tensors) == len(self._params))

    def _with_params(self, groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Groups for an import: hyperparameters plus our indices and session names."""
        return [{**g, "params": [i for i, p in enumerate(self._params) if p.group == k],
                 "param_names": [p.name for p in self._params if p.group == k]}
                for k, g in enumerate(groups)]

    @staticmethod
    def _server_names(state: StateDict) -> dict[int, str]:
        """The session's tensor name of each index of an exported state_dict."""
        names: dict[int, str] = {}
        for g in state["param_groups"]:
            names.update(zip(g["params"], g["param_names"], strict=True))
        return names

    # -- steps -------------------------------------------------------------------------

    def _sync_hyperparameters(self) -> None:
        """Send what changed in param_groups since the last call (schedulers write lr)."""
        for g, group in enumerate(self.param_groups):
            now = self._group_hyper(group)
            diff = {k: v for k, v in now.items() if self._sent[g].get(k) != v}
            if diff:
                self._transport.set_hyperparameters(self.session_id, g, diff)
                self._sent[g] = {**self._sent[g], **diff}

    def _gradients(self, grads: Any) -> tuple[list[WireTensor], dict[str, _Param]]:
        if grads is None:
            if self._numpy:
                raise ValueError("NumPy parameters carry no .grad: pass the gradients, "
                                 "opt.step(grads), one per parameter in order (None to skip)")
            pairs: Iterator[tuple[_Param, Any]] = ((p, p.value.grad) for p in self._params)
        elif isinstance(grads, Mapping):
            by_name = {p.name: p for p in self._params}
            unknown = sorted(set(grads) - set(by_name))
            if unknown:
                raise ValueError(f"gradients for unknown parameters {unknown}; the parameters "
                                 f"are {list(by_name)}")
            pairs = ((by_name[n], g) for n, g in grads.items())
        else:
            seq = list(grads)
            if len(seq) != len(self._params):
                raise ValueError(f"{len(seq)} gradients for {len(self._params)} parameters "
                                 f"({', '.join(p.name for p in self._params)})")
            pairs = zip(self._params, seq, strict=True)
        sent = {}
        wire = []
        for p, g in pairs:
            if g is None:
                continue
            wire.append(self._encode(p, g, self._wire, "grad"))
            sent[p.name] = p
        self._synchronize()
        return wire, sent

    def step(self, closure: Any = None, *, grads: Any = None) -> Any:
        """One optimizer step on the server; returns ``closure()``'s loss (or None).

        torch parameters: the gradients are their ``.grad`` (None: left alone). NumPy
        parameters: pass the gradients, ``opt.step(grads)`` with one array (or None)
        per parameter in order, or a dict by name.
        """
        if closure is not None and not callable(closure):
            closure, grads = None, closure
        loss = None
        if closure is not None:
            if torch is not None and not self._numpy:
                with torch.enable_grad():
                    loss = closure()
            else:
                loss = closure()
        wire, sent = self._gradients(grads)
        validation.check_step(self.algorithm, self.param_groups,
                              [p.value for p in sent.values()])
        if not wire:
            if self._coordinated and self._workers is not None and self._workers.count > 1:
                raise ValueError("no parameter has a gradient, but every worker of a "
                                 "synchronous session pushes every step (the others wait for "
                                 "it)")
            return loss
        self._sync_hyperparameters()
        self._send_changed()
        self._sequence = self._base_step + 1 if self._coordinated else self._sequence + 1
        while True:
            try:
                result = self._transport.step(
                    self.session_id, wire, return_datatype=self._wire,
                    sender=Sender(self._worker, self._sequence),
                    base_step=self._base_step if self._coordinated else None)
                break
            except errors.DeadlineExceeded:
                # no timeout of ours: the server ended a long wait for the other workers;
                # the same push again (recognised as such) waits on
                if not self._coordinated or getattr(self._transport, "timeout", 0) is not None:
                    raise
        self._base_step = result.step
        self._invalidate_state()
        for t in result.params:
            target = sent.get(t.name)
            if target is not None:
                self._write(target, t)
        self._synchronize()
        self.last_step = dataclasses.replace(result, params=())
        if result.duplicate:
            warnings.warn(f"adamserve: the server had applied push {self._sequence} of worker "
                          f"{self._worker!r} before (a resend, or an earlier answer was lost): "
                          "if this call carried a new gradient, it was not applied; the "
                          f"parameters are now those of step {result.step}",
                          RuntimeWarning, stacklevel=3)
        if result.skipped:
            warnings.warn(f"adamserve skipped step {result.step + 1}: non-finite gradients in "
                          f"{', '.join(result.nonfinite)}", RuntimeWarning, stacklevel=3)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._numpy:
            return
        super().zero_grad(set_to_none)

    # -- state_dict ----------------------------------------------------------------------

    def _local_entry(self, p: _Param, entry: Mapping[str, Any]) -> dict[str, Any]:
        """A server state entry as torch (or NumPy mode) keeps it, keys in torch's order."""
        keys = sorted(entry, key=lambda k: (_SLOT_ORDER.get(k, len(_SLOT_ORDER)), k))
        if self._numpy or torch is None:
            return {k: (float(entry[k]) if k in SCALAR_SLOTS else entry[k]) for k in keys}
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        out: dict[str, Any] = {}
        for key in keys:
            value = entry[key]
            if key in SCALAR_SLOTS:
                out[key] = torch.tensor(float(value), dtype=scalar)
            else:
                out[key] = torch.from_numpy(np.asarray(value)).to(p.value.device)
        return out

    def _server_state(self) -> dict[int, dict[str, Any]]:
        """Every parameter's state, by index, in torch's layout, fetched from the server."""
        exported = self._transport.export_state(self.session_id)
        names = self._server_names(exported)
        index = {p.name: i for i, p in enumerate(self._params)}
        state: dict[int, dict[str, Any]] = {}
        for k, entry in exported["state"].items():
            i = index[names[k]]
            state[i] = self._local_entry(self._params[i], entry)
        if self._algo.server == "adagrad":
            # torch.optim.Adagrad creates its state up front and expects it there
            for i, p in enumerate(self._params):
                if i not in state:
                    init = float(self.param_groups[p.group]["initial_accumulator_value"])
                    state[i] = self._local_entry(p, {"step": 0.0, "sum": np.full(
                        p.shape, init, dtype=tensors.DATATYPES[self._master])})
        return dict(sorted(state.items()))

    def state_dict(self) -> StateDict:
        """The optimizer state in torch.optim's format, fetched from the server."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._server_state()
        groups = []
        start = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        sd: StateDict = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _match(self, saved_groups: Sequence[Mapping[str, Any]]) -> dict[Any, int]:
        """Map the loaded state_dict's parameter ids to ours: by name when both sides
        have names, else by order (as torch does). Raises ValueError naming what differs."""
        groups = self.param_groups
        if len(saved_groups) != len(groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups; "
                             f"this optimizer has {len(groups)}")
        ours = [[p for p in self._params if p.group == g] for g in range(len(groups))]
        named = (all("param_names" in g for g in saved_groups)
                 and all("param_names" in g for g in groups))
        id_map: dict[Any, int] = {}
        index = {p.name: i for i, p in enumerate(self._params)}
        if named:
            where = {}
            for g, saved in enumerate(saved_groups):
                if len(saved["param_names"]) != len(saved["params"]):
                    raise ValueError(f"loaded param_groups[{g}] has {len(saved['params'])} "
                                     f"params but {len(saved['param_names'])} param_names")
                for pid, name in zip(saved["params"], saved["param_names"], strict=True):
                    where[str(name)] = (g, pid)
            local = {p.name: p for p in self._params}
            missing = sorted(set(local) - set(where))
            unexpected = sorted(set(where) - set(local))
            if missing or unexpected:
                raise ValueError(
                    "loaded state dict does not match the optimizer's parameters by name: "
                    + "; ".join(part for part in (
                        f"missing {missing}" if missing else "",
                        f"unexpected {unexpected}" if unexpected else "") if part))
            for name, (g, pid) in where.items():
                if local[name].group != g:
                    raise ValueError(f"parameter {name!r} is in group {g} of the loaded state "
                                     f"dict but in group {local[name].group} here")
                id_map[pid] = index[name]
            return id_map
        for g, (saved, mine) in enumerate(zip(saved_groups, ours, strict=True)):
            if len(saved["params"]) != len(mine):
                raise ValueError(
                    f"loaded state dict's param_groups[{g}] has {len(saved['params'])} "
                    f"parameters; this optimizer's has {len(mine)}: "
                    + ", ".join(f"{p.name} {list(p.shape)}" for p in mine))
            for pid, p in zip(saved["params"], mine, strict=True):
                id_map[pid] = index[p.name]
        return id_map

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a torch.optim-format state_dict (from this class or from torch.optim)
        into the server session, and its hyperparameters into ``param_groups``."""
        sd = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, sd)
            if result is not None:
                sd = result
        saved_groups = deepcopy(list(sd["param_groups"]))
        id_map = self._match(saved_groups)
        state: dict[int, dict[str, Any]] = {}
        for pid, entry in sd["state"].items():
            if pid not in id_map:
                continue
            i = id_map[pid]
            p = self._params[i]
            row: dict[str, Any] = {}
            for key, value in entry.items():
                if key in SCALAR_SLOTS:
                    row[key] = _scalar(value)
                    continue
                arr = _to_numpy(value)
                if _shape(arr) != p.shape:
                    raise ValueError(f"state of {p.name!r}: {key} has shape {list(arr.shape)}, "
                                     f"the parameter has shape {list(p.shape)}")
                row[key] = arr
            state[i] = row
        hyper = [self._group_hyper(g) for g in saved_groups]
        info = self._transport.import_state(self.session_id, {
            "state": state, "param_groups": self._with_params(hyper)})
        self._base_step = info.step  # the loaded state's step: the next push is for the next
        new_groups = []
        by_name = all("param_names" in g for g in (*saved_groups, *self.param_groups))
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            saved["params"] = group["params"]
            # torch takes the loaded names; matched by name, ours are the same names in
            # our order
            if "param_names" in group and ("param_names" not in saved or by_name):
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        self.param_groups = new_groups
        self._sent = [dict(h) for h in hyper]
        self._invalidate_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- the session, directly -------------------------------------------------------------

    def _invalidate_state(self) -> None:
        state = getattr(self, "state", None)
        if isinstance(state, ParamState):  # not yet while torch's __init__ runs
            state.invalidate()

    def describe(self) -> SessionInfo:
        """The server's view of the session (step count, lr per group, memory...), with
        the hyperparameters changed locally since the last step (by hand or by an LR
        scheduler) sent first, as the next step would."""
        self._sync_hyperparameters()
        return self._transport.describe(self.session_id)

    def checkpoint(self) -> Any:
        """Write a durable checkpoint of the session on the server now, with the
        parameters and hyperparameters changed locally since the last step."""
        self._sync_hyperparameters()
        self._send_changed()
        return self._transport.checkpoint(self.session_id)

    def set_schedule(self, schedule: Mapping[str, Any] | None) -> SessionInfo:
        """Replace (None: remove) the server-side learning-rate schedule."""
        self._schedule = dict(schedule) if schedule is not None else None
        return self._transport.set_schedule(self.session_id, schedule)

    def pull(self) -> None:
        """Overwrite the local parameters with the server's master weights."""
        info = self._transport.describe(self.session_id)
        by_name = {p.name: p for p in self._params}
        for t in self._transport.pull(self.session_id, datatype=self._master):
            self._write(by_name[t.name], t)
        self._synchronize()
        self._base_step = info.step
        self._invalidate_state()

    def set_workers(self, count: int) -> SessionInfo:
        """Change how many workers share the session (workers joined or left)."""
        return self._transport.set_workers(self.session_id, count)

    def restore_checkpoint(self, step: int | None = None) -> int:
        """Roll the session back to its checkpoint of ``step`` (default: the newest; for a
        sharded session, the newest step every shard holds) and pull its parameters.
        Returns the step; the training loop resumes from there."""
        steps = self._transport.list_checkpoints(self.session_id)
        if step is None:
            if not steps:
                raise errors.FailedPrecondition(
                    f"session {self.session_id!r} has no complete checkpoint to restore")
            step = steps[-1]
        self._transport.restore_checkpoint(self.session_id, step)
        self.pull()
        return step

    def close(self, delete: bool | None = None) -> None:
        """Release the connection; ``delete`` the session (default: only an anonymous one)."""
        anonymous = self._finalizer is not None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._session_id is not None and (anonymous if delete is None else delete):
            with contextlib.suppress(errors.NotFound):
                self._transport.delete_session(self._session_id)
        if self._owns_transport:
            self._transport.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# torch.optim's classes, with torch's exact arguments and defaults

Params = Iterable[Any]
_Betas = tuple[float, float]


class Adam(RemoteOptimizer):
    """``torch.optim.Adam`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = 1e-3, betas: _Betas = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "adam", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)


class AdamW(RemoteOptimizer):
    """``torch.optim.AdamW`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = 1e-3, betas: _Betas = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 server: Server = None, session: str | None = None,
                 token: str | None = None, wire_dtype: str | None = None,
                 master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "adamw", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)


class NAdam(RemoteOptimizer):
    """``torch.optim.NAdam`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = 2e-3, betas: _Betas = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "nadam", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         momentum_decay=momentum_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable)


class RAdam(RemoteOptimizer):
    """``torch.optim.RAdam`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = 1e-3, betas: _Betas = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "radam", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize, foreach=foreach, capturable=capturable,
                         decoupled_weight_decay=decoupled_weight_decay,
                         differentiable=differentiable)


class Adamax(RemoteOptimizer):
    """``torch.optim.Adamax`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = 2e-3, betas: _Betas = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False,
                 capturable: bool = False, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "adamax", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=foreach, maximize=maximize, differentiable=differentiable,
                         capturable=capturable)


class Adagrad(RemoteOptimizer):
    """``torch.optim.Adagrad`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0,
                 eps: float = 1e-10, foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 server: Server = None, session: str | None = None,
                 token: str | None = None, wire_dtype: str | None = None,
                 master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "adagrad", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value,
                         foreach=foreach, maximize=maximize, differentiable=differentiable,
                         fused=fused)


class RMSprop(RemoteOptimizer):
    """``torch.optim.RMSprop`` on an adamserve server (see :class:`RemoteOptimizer`)."""

    def __init__(self, params: Params, lr: float | Any = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0, momentum: float = 0,
                 centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "rmsprop", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                         weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                         maximize=maximize, differentiable=differentiable)


class LAMB(RemoteOptimizer):
    """LAMB (You et al. 2019, as optax.lamb) on an adamserve server.

    torch has no LAMB; the arguments follow the paper's defaults: ``lr=1e-3``,
    ``betas=(0.9, 0.999)``, ``eps=1e-6``, ``weight_decay=0.0``.
    """

    def __init__(self, params: Params, lr: float | Any = 1e-3, betas: _Betas = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, maximize: bool = False,
                 bias_correction: bool = True, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None,
                 timeout: float | None = None, workers: int | Workers | None = None,
                 worker_id: str | None = None) -> None:
        super().__init__(params, "lamb", server=server, session=session, token=token,
                         wire_dtype=wire_dtype, master_dtype=master_dtype, schedule=schedule,
                         timeout=timeout,
                         workers=workers, worker_id=worker_id,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize, bias_correction=bias_correction)

