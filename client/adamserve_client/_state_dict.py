"""torch-format state_dicts <-> the server's export and import.

The server exports a session's state by tensor name (``param_names`` in each group,
NumPy arrays, ``step`` a float); torch's ``state_dict()`` keys it by the index of
each parameter in ``param_groups`` order, with tensors on the parameter's device and
the keys in the order torch creates them. :func:`server_state` turns the first into
the second; :func:`match` and :func:`import_rows` turn a loaded torch state_dict
(from this client or from ``torch.optim``) into what the server imports, matching
its parameters to ours by name when both sides have names, else by order, as torch
does. The schedule-free pair keeps state in its groups too (schedulefree's ``k``,
``train_mode``, ...): :func:`group_state` reads it from the server's export or a
loaded state_dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve_client import tensors
from adamserve_client._params import LocalParams, Param
from adamserve_client._torch import is_tensor, shape, torch
from adamserve_client.transports.base import Hyperparameters, StateDict
from adamserve_proto.algorithms import AlgorithmDef, wire_value
from adamserve_proto.state_blob import SCALAR_SLOTS

__all__ = ["group_state", "import_rows", "match", "merged_groups", "packed_groups",
           "server_state", "with_params"]

# The order torch.optim (and schedulefree) create state entries in (state_dicts compare
# equal regardless).
_SLOT_ORDER = {k: i for i, k in enumerate((
    "step", "mu_product", "z", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "sum",
    "square_avg", "momentum_buffer", "grad_avg", "row_var", "col_var", "variance"))}


def _scalar(value: Any) -> float:
    if is_tensor(value):
        return float(value.item())
    return float(np.asarray(value).item())


def _to_numpy(value: Any) -> npt.NDArray[Any]:
    """A state tensor (torch or NumPy) as a host NumPy array the blob can hold."""
    if is_tensor(value):
        t = value.detach().to("cpu")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
        return np.asarray(t.numpy())
    arr = np.asarray(value)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return arr


# torch keeps these algorithms' step counts as Python ints (SparseAdam), not tensors
_INT_STEPS = frozenset({"sparse_adam"})


def _local_entry(p: Param, entry: Mapping[str, Any], numpy: bool,
                 int_step: bool = False) -> dict[str, Any]:
    """A server state entry as torch (or NumPy mode) keeps it, keys in torch's order."""
    keys = sorted(entry, key=lambda k: (_SLOT_ORDER.get(k, len(_SLOT_ORDER)), k))
    if int_step and "step" in entry:
        entry = {**entry, "step": round(float(entry["step"]))}
    if int_step or numpy or torch is None:
        return {k: (entry[k] if k == "step" and int_step else
                    float(entry[k]) if k in SCALAR_SLOTS else
                    entry[k] if numpy or torch is None else
                    torch.from_numpy(np.asarray(entry[k])).to(p.value.device))
                for k in keys}
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    out: dict[str, Any] = {}
    for key in keys:
        value = entry[key]
        if key in SCALAR_SLOTS:
            out[key] = torch.tensor(float(value), dtype=scalar)
        else:
            out[key] = torch.from_numpy(np.asarray(value)).to(p.value.device)
    return out


def _server_names(state: StateDict) -> dict[int, str]:
    """The session's tensor name of each index of an exported state_dict."""
    names: dict[int, str] = {}
    for g in state["param_groups"]:
        names.update(zip(g["params"], g["param_names"], strict=True))
    return names


def server_state(params: LocalParams, groups: Sequence[Mapping[str, Any]],
                 exported: StateDict, runs: str, master: str) -> dict[int, dict[str, Any]]:
    """Every parameter's state, by index, in torch's layout, from the server's export
    (of an algorithm that ``runs`` on the server, its state in ``master``)."""
    names = _server_names(exported)
    index = {p.name: i for i, p in enumerate(params)}
    numpy = bool(params.numpy)
    state: dict[int, dict[str, Any]] = {}
    for k, entry in exported["state"].items():
        i = index[names[k]]
        state[i] = _local_entry(params.all[i], entry, numpy, runs in _INT_STEPS)
    if runs == "adagrad":
        # torch.optim.Adagrad creates its state up front and expects it there
        for i, p in enumerate(params):
            if i not in state:
                init = float(groups[p.group]["initial_accumulator_value"])
                state[i] = _local_entry(p, {"step": 0.0, "sum": np.full(
                    p.shape, init, dtype=tensors.DATATYPES[master])}, numpy)
    return dict(sorted(state.items()))


def _state_value(algo: AlgorithmDef, key: str, value: Any) -> Any:
    """A per-group state value as the oracle keeps it (``k`` an int, ``train_mode`` a bool)."""
    v = wire_value(key, value)
    return int(v) if key in algo.integers and isinstance(v, float) else v


def group_state(groups: Sequence[Mapping[str, Any]], algo: AlgorithmDef) -> list[dict[str, Any]]:
    """The per-group state (the table's ``group_state`` keys) each of ``groups`` holds (the
    server's export, or a loaded state_dict), in group order; empty dicts for an
    algorithm that keeps none."""
    return [{k: _state_value(algo, k, g[k]) for k in algo.group_state if k in g}
            for g in groups]


def packed_groups(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``param_groups`` as torch's state_dict writes them: parameters as indices."""
    packed = []
    start = 0
    for group in groups:
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        packed.append(entry)
    return packed


def match(params: LocalParams, groups: Sequence[Mapping[str, Any]],
          saved_groups: Sequence[Mapping[str, Any]]) -> dict[Any, int]:
    """Map the loaded state_dict's parameter ids to ours: by name when both sides
    have names, else by order (as torch does). Raises ValueError naming what differs."""
    if len(saved_groups) != len(groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups; "
                         f"this optimizer has {len(groups)}")
    ours = [params.in_group(g) for g in range(len(groups))]
    named = (all("param_names" in g for g in saved_groups)
             and all("param_names" in g for g in groups))
    id_map: dict[Any, int] = {}
    index = {p.name: i for i, p in enumerate(params)}
    if named:
        where = {}
        for g, saved in enumerate(saved_groups):
            if len(saved["param_names"]) != len(saved["params"]):
                raise ValueError(f"loaded param_groups[{g}] has {len(saved['params'])} "
                                 f"params but {len(saved['param_names'])} param_names")
            for pid, name in zip(saved["params"], saved["param_names"], strict=True):
                where[str(name)] = (g, pid)
        local = params.by_name()
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


def _slots_of(algo: AlgorithmDef | None, shape: tuple[int, ...]) -> str:
    """The slots of ``algo`` a parameter of ``shape`` keeps (Adafactor's by its dims)."""
    names = ("row_var", "col_var", "variance")
    return ", ".join(n for n in names
                     if algo is not None and algo.slot_shape(n, shape) is not None)


def import_rows(params: LocalParams, saved_state: Mapping[Any, Mapping[str, Any]],
                id_map: Mapping[Any, int],
                algo: AlgorithmDef | None = None) -> dict[int, dict[str, Any]]:
    """The loaded state entries by our index, as the server imports them (scalars as
    floats, tensors as host NumPy arrays, shapes checked: the parameter's, or the shape
    ``algo`` keeps that slot in, Adafactor's factored statistics); entries of parameters
    ``id_map`` does not know are left out."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in saved_state.items():
        if pid not in id_map:
            continue
        i = id_map[pid]
        p = params.all[i]
        row: dict[str, Any] = {}
        for key, value in entry.items():
            if key in SCALAR_SLOTS:
                row[key] = _scalar(value)
                continue
            arr = _to_numpy(value)
            expected = p.shape if algo is None else algo.slot_shape(key, p.shape)
            if expected is None:
                raise ValueError(f"state of {p.name!r}: a parameter of shape {list(p.shape)} "
                                 f"keeps no {key} (its state: {_slots_of(algo, p.shape)})")
            if shape(arr) != expected:
                what = ("the parameter has shape" if expected == p.shape else
                        f"expected {key} of a parameter of shape {list(p.shape)} to have")
                raise ValueError(f"state of {p.name!r}: {key} has shape {list(arr.shape)}, "
                                 f"{what} {list(expected)}")
            row[key] = arr
        state[i] = row
    return state


def with_params(params: LocalParams, groups: Sequence[Hyperparameters]) -> list[dict[str, Any]]:
    """Groups for an import: hyperparameters plus our indices and session names."""
    return [{**g, "params": [i for i, p in enumerate(params) if p.group == k],
             "param_names": [p.name for p in params if p.group == k]}
            for k, g in enumerate(groups)]


def merged_groups(groups: Sequence[Mapping[str, Any]],
                  saved_groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loaded groups with our parameters in them: the new ``param_groups``."""
    new_groups = []
    by_name = all("param_names" in g for g in (*saved_groups, *groups))
    for group, saved in zip(groups, saved_groups, strict=True):
        saved["params"] = group["params"]
        # torch takes the loaded names; matched by name, ours are the same names in
        # our order
        if "param_names" in group and ("param_names" not in saved or by_name):
            saved["param_names"] = group["param_names"]
        new_groups.append(saved)
    return new_groups
