"""torch-compatible ``state_dict`` export and import for a :class:`FlatOptimizer`.

The format is torch.optim's: ``{"state": {index: {"step": float, slot: array}},
"param_groups": [{hyperparameters..., "params": [index...], "param_names": [...]}]}``
with NumPy arrays for tensors. Hyperparameters use torch's names (``betas`` as a
pair); torch's implementation switches (foreach, fused, ...) are accepted and
ignored on import.

The schedule-free pair writes schedulefree's format: ``z`` and ``exp_avg_sq`` per
parameter and no ``step``; the groups carry ``k``, ``train_mode``, ``weight_sum``,
``lr_max`` and ``scheduled_lr``, and import sets them as torch's ``load_state_dict``
does, without moving the parameters between y and x. Muon's entries hold only
``momentum_buffer``, as torch's do (no ``step``); its groups carry ``ns_coefficients``
as a triple and ``adjust_lr_fn`` by name (or None). SparseAdam's ``step`` is a Python
int, as torch's SparseAdam keeps it (the others' a float, torch's step tensors' value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adamserve.engine import algorithms as alg
from adamserve.engine import moments
from adamserve.engine.optimizer import FlatOptimizer, listed
from adamserve.errors import shown
from adamserve_proto import algorithms as table

# Group keys that are not hyperparameters: torch.optim's implementation switches (they
# select an implementation, not the maths), the group's members and a scheduler's note.
IGNORED_GROUP_KEYS = frozenset(table.SWITCHES) | {"params", "param_names", "initial_lr"}

StateDict = dict[str, Any]

MAX_STEP = 2**62  # an int64 step counter with room to count on


def torch_group(h: Mapping[str, alg.HyperValue]) -> dict[str, Any]:
    """A group's hyperparameters under torch's names (``betas`` a pair, whole-number keys
    such as schedulefree's ``k`` as ints)."""
    return {k: int(v) if k in table.INTEGER_KEYS and not isinstance(v, bool) else v
            for k, v in table.join_betas(alg.choice_names(alg.with_none(h))).items()}


def export_state(opt: FlatOptimizer, native: bool = False) -> StateDict:
    """The optimizer's state as torch.optim would write it (copies, on the host): narrow
    moments (bfloat16, int8) dequantised to float32. ``native``: the moments as stored
    instead, each as the parts :func:`adamserve.engine.moments.tensor_native` names
    (``exp_avg.codes`` in the tensor's shape and ``exp_avg.scale`` per block, or
    ``exp_avg.bf16``; a plain slot under its own name), which :func:`import_state`
    reads back."""
    layout = opt.layout
    host = {} if native else {name: opt.slot_values(name) for name in opt.slots}
    state: dict[int, dict[str, Any]] = {}
    # schedulefree and Muon keep no per-param step
    counted = opt.algorithm not in alg.SCHEDULE_FREE | {alg.Algorithm.MUON}
    as_int = opt.algorithm is alg.Algorithm.SPARSE_ADAM  # torch's SparseAdam: state["step"] = 0
    for i, t in enumerate(layout.tensors):
        if opt.seg_step[i] == 0:
            continue  # torch keeps no state for a parameter that never stepped
        step = int(opt.seg_step[i]) if as_int else float(opt.seg_step[i])
        entry: dict[str, Any] = {"step": step} if counted else {}
        for slot in opt.group_slots(t.group):
            shape = opt.slot_shape(slot, i)  # Adafactor's factored slots: torch's shapes
            if shape is None:
                continue
            if not native:
                entry[slot] = np.array(host[slot][opt.slot_span(slot, i)]).reshape(shape)
                continue
            for part, arr in moments.tensor_native(opt.slots[slot], opt.slot_offsets(slot), i,
                                                   opt.backend).items():
                entry[f"{slot}.{part}" if part else slot] = (
                    arr if part == "scale" else arr.reshape(shape))
        if opt.algorithm is alg.Algorithm.NADAM:
            entry["mu_product"] = float(opt.mu_product[i])
        state[i] = entry
    groups = []
    for g, h in enumerate(opt.groups):
        idx = [i for i, t in enumerate(layout.tensors) if t.group == g]
        groups.append({**torch_group(h), "params": idx,
                       "param_names": [layout.tensors[i].name for i in idx]})
    return {"state": state, "param_groups": groups}


def _stored_entry(entry: Mapping[str, Any], name: str, numel: int) -> dict[str, Any]:
    """A parameter's state with the native form's parts (``exp_avg.codes`` and
    ``exp_avg.scale``, ``exp_avg.bf16``) read back as the moments' values (float32, the
    tensor's shape), the parts themselves under ``"native"``; entries in torch's form
    pass as they are."""
    out: dict[str, Any] = {k: v for k, v in entry.items() if "." not in str(k) and k != "native"}
    stored: dict[str, dict[str, Any]] = {}
    for key, value in entry.items():
        slot, dot, part = str(key).partition(".")
        if dot:
            stored.setdefault(slot, {})[part] = np.asarray(value)
    for slot, parts in stored.items():
        if slot in out:
            raise ValueError(f"state of {shown(name)}: {slot} given both as a tensor and as "
                             f"{', '.join(sorted(parts))}")
        values = moments.tensor_values(parts, numel, slot in moments.SIGNED_SLOTS,
                                       f"state of {shown(name)}: {slot}")
        shaped = parts.get("codes", parts.get("bf16", parts.get("")))
        out[slot] = values.reshape(np.shape(shaped)) if shaped is not None else values
    if stored:
        out["native"] = stored
    return out


def _match_indices(opt: FlatOptimizer, groups: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Map the state_dict's parameter indices to ours: by name when names are given."""
    theirs: list[tuple[int, str | None, int]] = []
    for g, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise ValueError(f"param_groups[{g}]: expected a mapping")
        params = list(group.get("params", []))
        names = group.get("param_names")
        if names and len(names) != len(params):
            raise ValueError(f"param_groups[{g}]: {len(names)} param_names for "
                             f"{len(params)} params")
        for k, idx in enumerate(params):
            theirs.append((int(idx), str(names[k]) if names else None, g))
    indices = [idx for idx, _, _ in theirs]
    if len(set(indices)) != len(indices):
        raise ValueError("state_dict: a parameter index appears more than once in param_groups")
    given = [name for _, name, _ in theirs if name is not None]
    if len(set(given)) != len(given):
        raise ValueError("state_dict: a parameter name appears more than once in param_groups")
    ours = opt.layout.tensors
    if len(theirs) != len(ours):
        raise ValueError(
            f"state_dict holds {len(theirs)} parameters in {len(groups)} groups; the session "
            f"has {len(ours)}: {listed([t.name for t in ours])}")
    mapping: dict[int, int] = {}
    if all(name is not None for _, name, _ in theirs):
        for idx, name, _ in theirs:
            try:
                mine = opt.layout.index(str(name))
            except KeyError:
                raise ValueError(
                    f"state_dict parameter {shown(name)} is not a tensor of this session") from None
            mapping[idx] = mine
    else:
        for pos, (idx, _, _) in enumerate(theirs):
            mapping[idx] = pos
    for idx, _, g in theirs:
        if ours[mapping[idx]].group != g:
            raise ValueError(
                f"parameter {shown(ours[mapping[idx]].name)} is in group {g} of the state_dict "
                f"but in group {ours[mapping[idx]].group} of the session")
    return mapping


def import_state(opt: FlatOptimizer, sd: Mapping[str, Any]) -> None:
    """Load a torch-format state_dict into ``opt``; validates fully before changing anything."""
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("state_dict: expected a mapping with 'state' and 'param_groups'")
    groups = sd["param_groups"]
    step_count = sd.get("step_count")  # optional: the session's step when no state says it
    if step_count is not None and (isinstance(step_count, bool) or not isinstance(
            step_count, int | float) or not 0 <= float(step_count) < MAX_STEP
            or float(step_count) != int(step_count)):
        raise ValueError(f"step_count {shown(step_count)}: expected a whole number in [0, 2**62)")
    if len(groups) != len(opt.groups):
        raise ValueError(f"state_dict has {len(groups)} param_groups; the session has "
                         f"{len(opt.groups)}")
    new_hyper = []
    for g, group in enumerate(groups):
        given = {k: v for k, v in group.items() if k not in IGNORED_GROUP_KEYS}
        try:
            new_hyper.append(alg.resolve_hyperparameters(opt.algorithm, given, base=opt.groups[g]))
        except ValueError as exc:
            raise ValueError(f"param_groups[{g}]: {exc}") from None
    mapping = _match_indices(opt, groups)
    spec = alg.SPECS[opt.algorithm]
    counted = opt.algorithm not in alg.SCHEDULE_FREE
    staged: dict[int, dict[str, Any]] = {}
    for key, entry in dict(sd["state"]).items():
        idx = int(key)
        if idx not in mapping:
            raise ValueError(f"state_dict state[{idx}] names no parameter of its param_groups")
        mine = mapping[idx]
        t = opt.layout.tensors[mine]
        need = tuple(s for s in spec.slots(new_hyper[t.group])
                     if opt.slot_shape(s, mine) is not None)
        entry = _stored_entry(entry, t.name, t.numel)
        row: dict[str, Any] = {"step": entry.get("step")}
        for slot in need:
            if slot not in entry:
                raise ValueError(f"state of {shown(t.name)}: missing {slot!r}; expected {need}")
            arr = np.asarray(entry[slot])
            expected = opt.slot_shape(slot, mine)
            if tuple(arr.shape) != expected:
                raise ValueError(f"state of {shown(t.name)}: {slot} has shape {list(arr.shape)}, "
                                 f"expected {list(expected or ())}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"state of {shown(t.name)}: {slot} has dtype {arr.dtype}, "
                                 "expected a floating type")
            # (by the session's state dtype: the import may turn the slot on, e.g. amsgrad)
            if opt.state_dtype in moments.NARROW_DTYPES and not np.isfinite(arr).all():
                raise ValueError(f"state of {shown(t.name)}: {slot} holds NaN or Inf, which "
                                 f"{opt.state_dtype} moments cannot keep")
            row[slot] = arr
        row["native"] = {slot: parts for slot, parts in entry.get("native", {}).items()
                         if slot in need and moments.kind_of(parts) == opt.state_dtype}
        if opt.algorithm is alg.Algorithm.MUON:  # no step in torch's: state means it stepped
            row["step"] = max(1, int(opt.seg_step[mine]))
            staged[mine] = row
            continue
        if not counted:  # a parameter with a z: it has stepped, as often as its group
            row["step"] = max(1, int(new_hyper[t.group]["k"]))
            staged[mine] = row
            continue
        step = np.asarray(row["step"]).item() if row["step"] is not None else None
        if (step is None or not isinstance(step, int | float) or not float(step).is_integer()
                or not 0 <= float(step) < MAX_STEP):
            raise ValueError(f"state of {shown(t.name)}: step must be a whole number in "
                             f"[0, 2**62), got {shown(step)}")
        row["step"] = int(step)
        if opt.algorithm is alg.Algorithm.NADAM:
            mu = np.asarray(entry.get("mu_product", 1.0))
            if mu.size != 1 or not np.isfinite(mu.astype(np.float64)).all():
                raise ValueError(f"state of {shown(t.name)}: mu_product must be one finite number")
            row["mu_product"] = float(mu.item())
        staged[mine] = row
    # validated: now change state
    opt.groups[:] = new_hyper
    opt._ensure_slots()
    host = {name: np.array(opt.slot_values(name), dtype=opt.dtype) for name in opt.slots}
    for name, buf in host.items():
        for i, t in enumerate(opt.layout.tensors):
            buf[opt.slot_span(name, i)] = alg.initial_slot_value(opt.algorithm, name,
                                                                 opt.groups[t.group])
    opt.seg_step[:] = 0
    opt.mu_product[:] = 1.0
    for i, row in staged.items():
        for slot, arr in row.items():
            if slot in host and slot != "native":
                host[slot][opt.slot_span(slot, i)] = arr.reshape(-1)
        opt.seg_step[i] = row["step"]
        if "mu_product" in row:
            opt.mu_product[i] = row["mu_product"]
    for name, buf in host.items():
        opt.set_slot_values(name, buf)  # quantised where the moments are narrow
    for i, row in staged.items():  # the native form's parts, as they were stored
        for slot, parts in row["native"].items():
            moments.put_tensor_native(opt.slots[slot], opt.slot_offsets(slot), i, parts,
                                      opt.backend)
    opt.step_count = int(opt.seg_step.max()) if len(opt.seg_step) else 0
    if not counted:  # the groups' step counts (a group steps without gradients too)
        opt.step_count = max([opt.step_count, *(int(h["k"]) for h in opt.groups)])
    if step_count is not None:
        opt.step_count = max(opt.step_count, int(step_count))
