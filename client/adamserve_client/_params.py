"""The optimizer's parameters on this side: the local tensors (or NumPy arrays), their
values and gradients on the wire, and which of them changed since the server's copy.

:class:`LocalParams` holds one :class:`Param` per optimized tensor, in session order
(the order of ``param_groups``, as torch's state_dict indices). It encodes values and
gradients for the wire (a CUDA tensor goes through a pinned host buffer reused
across steps), writes what the server sends back into the tensors in place, and
finds the parameters changed locally by their stamp (:func:`stamp`: torch's version
counter and storage address), so that a step where nothing changed costs two
attribute reads per parameter and nothing more.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from adamserve_client import errors, tensors
from adamserve_client._torch import TORCH_DTYPES, is_tensor, shape, torch
from adamserve_client.transports import Transport, WireTensor

__all__ = ["ROWS_UNCHANGED", "LocalParams", "Param", "add_numpy_group", "sparse_message",
           "stamp"]

# Algorithms whose step leaves the rows a row-sparse gradient does not carry exactly
# as they were (SparseAdam is lazy; Adagrad adds zero to them): a step returns only
# the rows sent.
ROWS_UNCHANGED = frozenset({"sparse_adam", "adagrad"})
# torch.optim's messages for a gradient of the layout it refuses: a sparse one to the
# dense algorithms (AdamW's is Adam's, its base class), a dense one to SparseAdam.
_DENSE = {"sparse_adam": "SparseAdam does not support dense gradients, please consider Adam "
                         "instead"}
_SPARSE = {
    "adam": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "amsgrad": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "adamw": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "nadam": "NAdam does not support sparse gradients",
    "radam": "RAdam does not support sparse gradients",
    "adamax": "Adamax does not support sparse gradients",
    "rmsprop": "RMSprop does not support sparse gradients",
}
# torch takes sparse gradients here (sent row-sparse), but not with weight decay
_SPARSE_DECAY = {"adagrad": "weight_decay option is not compatible with sparse gradients"}


def sparse_message(algorithm: str, class_name: str) -> str | None:
    """What torch raises for a sparse gradient given to ``algorithm`` (None: torch takes
    it, and so does the server, as a row-sparse gradient)."""
    if algorithm in ROWS_UNCHANGED:
        return None
    return _SPARSE.get(algorithm, f"{class_name} does not support sparse gradients")


@dataclass
class Param:
    """One optimized tensor: its session name, group and the local array or tensor."""

    name: str
    group: int
    value: Any
    shape: tuple[int, ...]
    # what the value's stamp was when it last matched the server's copy (None: it may
    # not match; it is sent before the next step)
    synced: tuple[int, int] | None = None


def stamp(value: Any) -> tuple[int, int]:
    """What changes when a torch tensor is changed in place (autograd's version counter:
    copy_, clamp_, load_state_dict, nn.init) or given other storage (``p.data = x``,
    ``.to(device)``). NumPy arrays carry neither: their stamp never changes, and
    :meth:`LocalParams.mark_changed` says when they did."""
    if not is_tensor(value):
        return (0, 0)
    try:
        return (int(value._version), int(value.data_ptr()))
    except RuntimeError:  # an inference tensor has no version counter: always send it
        return (-1, next(_UNIQUE))


_UNIQUE = itertools.count()  # stamps that never match, not even each other


class LocalParams:
    """The optimizer's parameters, in session order, and their pinned host buffers.

    ``algorithm`` and ``class_name`` say which gradient layouts torch's optimizer of
    that name takes, and what it raises for the others.
    """

    def __init__(self, algorithm: str, class_name: str) -> None:
        self.all: list[Param] = []
        self.numpy: bool | None = None  # NumPy arrays or torch tensors: set by the first
        self._sparse = sparse_message(algorithm, class_name)
        self._dense = _DENSE.get(algorithm)
        self._sparse_decay = _SPARSE_DECAY.get(algorithm)
        self._pinned: dict[tuple[str, str], Any] = {}
        self.groups: Sequence[Mapping[str, Any]] = ()  # the param_groups: weight_decay

    def __iter__(self) -> Iterator[Param]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def by_name(self) -> dict[str, Param]:
        return {p.name: p for p in self.all}

    def in_group(self, group: int) -> list[Param]:
        return [p for p in self.all if p.group == group]

    # -- building them -----------------------------------------------------------------

    def set_mode(self, first: Any) -> None:
        """Check that ``first`` (a value or a ``(name, value)`` pair) is of the same kind
        as the parameters before it: all torch tensors or all NumPy arrays."""
        value = first[1] if isinstance(first, tuple) else first
        numpy = isinstance(value, np.ndarray)
        if not numpy and not is_tensor(value):
            raise TypeError("optimizer can only optimize torch Tensors or NumPy float arrays, "
                            f"but one of the params is {type(value).__name__}")
        if self.numpy is None:
            self.numpy = numpy
        elif self.numpy != numpy:
            raise TypeError("optimizer parameters must be all torch Tensors or all NumPy arrays")

    def new_group(self, g: int, group: Mapping[str, Any]) -> list[Param]:
        """The parameters of group ``g`` (not yet added), named and checked."""
        names = group.get("param_names")
        start = len(self.all)
        taken = {p.name for p in self.all}
        values = {id(p.value) for p in self.all}
        added = []
        for k, value in enumerate(group["params"]):
            self.set_mode(value)
            if is_tensor(value) and not value.is_floating_point():
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
            added.append(Param(name, g, value, shape(value)))
        return added

    # -- on the wire -------------------------------------------------------------------

    def _host_tensor(self, p: Param, x: Any, datatype: str, key: str) -> Any:
        """``x`` (torch) as a contiguous CPU tensor of ``datatype``; CUDA goes through a
        pinned host buffer that is reused across steps."""
        dtype = TORCH_DTYPES[datatype]
        x = x.detach()
        if x.device.type == "cpu":
            return x.to(dtype).contiguous()
        buf = self._pinned_buffer(p, dtype, key)
        buf.copy_(x.to(dtype), non_blocking=True)
        return buf

    def _pinned_buffer(self, p: Param, dtype: Any, key: str) -> Any:
        """A page-locked host tensor shaped like ``p``, kept for the next steps."""
        buf = self._pinned.get((p.name, key))
        if buf is None or buf.dtype != dtype or shape(buf) != p.shape:
            buf = torch.empty(p.shape, dtype=dtype, pin_memory=True)
            self._pinned[(p.name, key)] = buf
        return buf

    def encode(self, p: Param, x: Any, datatype: str, key: str) -> WireTensor:
        """``x`` (``p``'s value or gradient) as a wire tensor; ``key`` names its buffer.
        A sparse gradient goes row-sparse: the rows it holds values for, summed per row
        (torch's ``coalesce()``)."""
        if key == "grad" and self._dense is not None and not (
                is_tensor(x) and x.is_sparse):
            raise RuntimeError(self._dense)
        if isinstance(x, np.ndarray) or not is_tensor(x):
            arr = np.asarray(x)
            if shape(arr) != p.shape:
                raise ValueError(f"gradient for {p.name!r} has shape {list(arr.shape)}, the "
                                 f"parameter has shape {list(p.shape)}")
            return WireTensor(p.name, p.shape, datatype, tensors.encode(arr, datatype))
        if shape(x) != p.shape:
            raise ValueError(f"gradient for {p.name!r} has shape {list(x.shape)}, the "
                             f"parameter has shape {list(p.shape)}")
        if x.is_sparse:
            return self._rows(p, x, datatype)
        host = self._host_tensor(p, x, datatype, key)
        data = memoryview(host.reshape(-1).view(torch.uint8).numpy()) if host.numel() else b""
        return WireTensor(p.name, p.shape, datatype, data)

    def _rows(self, p: Param, x: Any, datatype: str) -> WireTensor:
        """A sparse (COO) gradient as a row-sparse wire tensor."""
        if self._sparse is not None:
            raise RuntimeError(self._sparse)
        if self._sparse_decay is not None and self.groups and float(
                self.groups[p.group].get("weight_decay", 0)) != 0:
            raise RuntimeError(self._sparse_decay)
        if not p.shape:
            raise ValueError(f"gradient for {p.name!r}: a sparse gradient of a scalar has no "
                             "rows; send it dense")
        x = x.detach().coalesce()
        if x.sparse_dim() != 1:
            if self._dense is not None:  # SparseAdam: lazy per element, rows are not
                raise ValueError(
                    f"gradient for {p.name!r}: sparse in {x.sparse_dim()} dims; the server "
                    "steps whole rows (a sparse gradient over the first dim, as "
                    "nn.Embedding(sparse=True) makes): send grad.coalesce().to_dense()."
                    "to_sparse(1)")
            x = x.to_dense().to_sparse(1).coalesce()  # Adagrad: zeros change nothing
        rows = x.indices()[0].to("cpu", torch.int64).contiguous()
        values = x.values().to("cpu", TORCH_DTYPES[datatype]).contiguous()
        data = (memoryview(values.reshape(-1).view(torch.uint8).numpy()) if values.numel()
                else b"")
        return WireTensor(p.name, p.shape, datatype, data, tensors.row_bytes(rows.numpy()))

    def synchronize(self) -> None:
        """Wait for the asynchronous copies through the pinned buffers."""
        if self._pinned and torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()

    def write(self, p: Param, t: WireTensor) -> None:
        """Copy a tensor from the server into the parameter, in place."""
        if t.shape != p.shape:
            raise errors.ServerError(f"server sent {t.name!r} with shape {list(t.shape)}, the "
                                     f"parameter has shape {list(p.shape)}")
        if t.rows is not None:
            self._write_rows(p, t)
            return
        if not is_tensor(p.value):
            tensors.decode_into(p.value, t.data, t.datatype)
            p.synced = stamp(p.value)
            return
        if not len(memoryview(t.data)):
            p.synced = stamp(p.value)
            return
        with warnings.catch_warnings():
            # torch warns that a bytes object is not writable; it is only read here
            warnings.simplefilter("ignore")
            src = torch.frombuffer(t.data, dtype=TORCH_DTYPES[t.datatype]).view(p.shape)
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
        p.synced = stamp(value)  # after our own in-place write

    def _write_rows(self, p: Param, t: WireTensor) -> None:
        """Copy the rows a row-sparse tensor from the server carries into the parameter."""
        rows = np.frombuffer(t.rows, dtype="<i8") if t.rows is not None else np.zeros(0)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= p.shape[0]):
            raise errors.ServerError(f"server sent rows of {t.name!r} outside [0, "
                                     f"{p.shape[0]})")
        values = tensors.decode(t.data, t.datatype).reshape(len(rows), *p.shape[1:])
        if not values.flags.writeable:  # a view of the reply: torch wants its own
            values = values.copy()
        if not is_tensor(p.value):
            p.value[rows] = values
        elif len(rows):
            value = p.value
            index = torch.from_numpy(rows.astype(np.int64)).to(value.device)
            with torch.no_grad():
                value.index_copy_(0, index, torch.from_numpy(values).to(value.device,
                                                                         value.dtype))
        p.synced = stamp(p.value)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around our own writes of server values: a write bumps the version counter,
        which views of one storage share, so every parameter in sync before is in sync
        after (a parameter changed locally stays marked)."""
        in_sync = [p for p in self.all if p.synced is not None and p.synced == stamp(p.value)]
        yield
        for p in in_sync:
            p.synced = stamp(p.value)

    def write_all(self, sent: Iterable[WireTensor]) -> None:
        """Write every tensor of a pull into the parameter of its name."""
        by_name = self.by_name()
        with self.writing():
            for t in sent:
                self.write(by_name[t.name], t)
        self.synchronize()

    def values(self, params: Sequence[Param], datatype: str) -> list[WireTensor]:
        out = [self.encode(p, p.value, datatype, "value") for p in params]
        self.synchronize()
        return out

    def gradients(self, grads: Any, datatype: str) -> tuple[list[WireTensor], dict[str, Param]]:
        """The gradients to send (``None``: the parameters' ``.grad``; else one per
        parameter in order, or a dict by name), skipping the missing ones, and the
        parameters they are for."""
        if grads is None:
            if self.numpy:
                raise ValueError("NumPy parameters carry no .grad: pass the gradients, "
                                 "opt.step(grads), one per parameter in order (None to skip)")
            pairs: Iterator[tuple[Param, Any]] = ((p, p.value.grad) for p in self.all)
        elif isinstance(grads, Mapping):
            by_name = self.by_name()
            unknown = sorted(set(grads) - set(by_name))
            if unknown:
                raise ValueError(f"gradients for unknown parameters {unknown}; the parameters "
                                 f"are {list(by_name)}")
            pairs = ((by_name[n], g) for n, g in grads.items())
        else:
            seq = list(grads)
            if len(seq) != len(self.all):
                raise ValueError(f"{len(seq)} gradients for {len(self.all)} parameters "
                                 f"({', '.join(p.name for p in self.all)})")
            pairs = zip(self.all, seq, strict=True)
        sent = {}
        wire = []
        for p, g in pairs:
            if g is None:
                continue
            wire.append(self.encode(p, g, datatype, "grad"))
            sent[p.name] = p
        self.synchronize()
        return wire, sent

    # -- changed locally ---------------------------------------------------------------

    @staticmethod
    def mark_synced(params: Iterable[Param]) -> None:
        for p in params:
            p.synced = stamp(p.value)

    def changed(self) -> list[Param]:
        """The parameters whose local values may differ from the server's copy: changed
        in place or rebound since we last wrote or sent them, or marked by
        :meth:`mark_changed`. Costs two attribute reads per parameter."""
        changed = [p for p in self.all if p.synced != stamp(p.value)]
        for p in changed:
            if shape(p.value) != p.shape:
                raise ValueError(f"parameter {p.name!r} now has shape {list(p.value.shape)}, "
                                 f"but the session holds it as {list(p.shape)}: a tensor keeps "
                                 "its shape (build a new optimizer for the new model)")
        return changed

    def send_changed(self, transport: Transport, session_id: str, datatype: str) -> None:
        """Send the parameters changed locally since the last step, so the next step starts
        from what the user's tensors hold (as torch.optim's does); nothing when none did."""
        changed = self.changed()
        if changed:
            transport.set_parameters(session_id, self.values(changed, datatype))
            self.mark_synced(changed)

    def mark_changed(self, params: Iterable[Any] | None = None) -> None:
        """Mark ``params`` (tensors, arrays or ``(name, value)`` pairs; None: all) as
        changed, so that :meth:`send_changed` sends them."""
        if params is None:
            marked = self.all
        else:
            ids = {id(x[1] if isinstance(x, tuple) else x) for x in params}
            marked = [p for p in self.all if id(p.value) in ids]
            if len(marked) != len(ids):
                raise ValueError("params_changed: some of the given tensors are not "
                                 "parameters of this optimizer")
        for p in marked:
            p.synced = None


def add_numpy_group(param_groups: list[dict[str, Any]], defaults: Mapping[str, Any],
                    param_group: dict[str, Any], params: LocalParams) -> None:
    """torch's ``add_param_group``, for NumPy arrays: check ``param_group``, fill in the
    defaults and append it to ``param_groups``."""
    listed = param_group["params"]
    if isinstance(listed, np.ndarray):
        listed = [listed]
    elif isinstance(listed, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections")
    arrays, names = [], []
    for p in listed:
        if isinstance(p, tuple):
            names.append(str(p[0]))
            p = p[1]
        params.set_mode(p)
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
    for key, default in defaults.items():
        param_group.setdefault(key, default)
    seen = {id(p) for group in param_groups for p in group["params"]}
    for group in param_groups:
        if ("param_names" in group) != ("param_names" in param_group):
            raise ValueError("all optimizer param groups should be with/without names")
    if seen & {id(p) for p in arrays}:
        raise ValueError("some parameters appear in more than one parameter group")
    param_groups.append(param_group)
