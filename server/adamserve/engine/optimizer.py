"""Optimizer state over flat buffers, and the step that updates it.

:class:`FlatOptimizer` holds one flat buffer per slot (param, grad, exp_avg, ...),
the layout that names the tensors inside them, the per-tensor step counts and the
schedule clock. A step is: optional segmented reduction over the gradient
(non-finite check, clipping norms), coefficients on the host, one fused kernel.
It knows nothing of sessions, wires or files; ``adamserve.sessions`` wraps it.

The schedule-free pair keeps state per parameter group too (schedulefree's ``k``,
``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``), and keeps it where the
package does: in the groups, beside the hyperparameters. So everything that carries
the groups (checkpoints, state hashes, describe, the torch-format state_dict) carries
it; only :meth:`FlatOptimizer.set_hyperparameters` tells the two apart (the steps
advance that state; of it only ``train_mode`` may be set, which swaps the parameters
between schedulefree's y and x).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine import algorithms as alg
from adamserve.engine import moments, muon, sparse_adam
from adamserve.engine.algorithms import Algorithm, Hyperparameters
from adamserve.engine.backend import Array, Backend, Blocks, make_blocks, select_backend
from adamserve.engine.schedules import Schedule
from adamserve.errors import FailedPrecondition, shown
from adamserve_proto import algorithms as table

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

STATE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    group: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # a Python int: no int64 wrap, and fast for small shapes


def repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted (O(n): sessions may have 64k tensors)."""
    return sorted(n for n, count in Counter(names).items() if count > 1)


def listed(names: Sequence[str], most: int = 8) -> str:
    """Tensor names for an error message: the first ``most``, a long one shortened."""
    shown_names = [n if len(n) <= 64 else shown(n) for n in names[:most]]
    return ", ".join(shown_names) + (", ..." if len(names) > most else "")


@dataclass(frozen=True)
class Layout:
    """Where each named tensor lives in the flat buffers, and which index each name has
    (a dict: a step over many small tensors looks up every one)."""

    tensors: tuple[TensorSpec, ...]
    offsets: I64 = field(init=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = np.array([t.numel for t in self.tensors], dtype=np.int64)
        offsets = np.zeros(len(self.tensors) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        object.__setattr__(self, "offsets", offsets)
        index = {t.name: i for i, t in enumerate(self.tensors)}
        if len(index) != len(self.tensors):
            dup = repeated(t.name for t in self.tensors)
            raise ValueError(f"tensor names must be unique; repeated: {listed(dup)}")
        object.__setattr__(self, "_index", index)

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.tensors)

    def index(self, name: str) -> int:
        """The index of tensor ``name``; KeyError if the layout has none."""
        return self._index[name]

    def span(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


@dataclass(frozen=True)
class ClipConfig:
    """Gradient clipping: ``max_norm`` over all tensors (global) or each tensor alone."""

    max_norm: float | None = None
    per_tensor: bool = False


@dataclass(frozen=True)
class StepReport:
    step: int  # the session's step count after this call
    skipped: bool
    grad_norm: float | None  # the global gradient norm when it was computed
    nonfinite: tuple[str, ...] = ()  # tensors whose gradient held NaN or Inf


def slot_offsets(algorithm: Algorithm, layout: Layout, name: str) -> I64:
    """Where each tensor of ``layout`` starts in the buffer of slot ``name`` (see
    :meth:`FlatOptimizer.slot_offsets`)."""
    row = table.ALGORITHMS[algorithm.value]
    if row.slot_shapes is None:
        return layout.offsets
    shapes = (row.slot_shape(name, t.shape) for t in layout.tensors)
    sizes = np.array([0 if s is None else math.prod(s) for s in shapes], dtype=np.int64)
    offsets = np.zeros(len(layout) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


class FlatOptimizer:
    """One optimizer (one algorithm, several parameter groups) over flat buffers."""

    def __init__(
        self,
        algorithm: Algorithm | str,
        layout: Layout,
        groups: Sequence[Mapping[str, Any]] = ({},),
        *,
        backend: Backend | None = None,
        dtype: str = "float32",
        schedule: Schedule | None = None,
        clip: ClipConfig = ClipConfig(),
        skip_nonfinite: bool = True,
        params: npt.NDArray[Any] | None = None,
        state_dtype: str | None = None,
    ) -> None:
        # options implied by an alias (``amsgrad`` is adam with amsgrad=True), also for
        # groups added later
        self._alias: Hyperparameters = {}
        if isinstance(algorithm, str) and not isinstance(algorithm, Algorithm):
            algorithm, self._alias = alg.parse_algorithm(algorithm)
            groups = [{**self._alias, **g} for g in groups]
        self.algorithm = algorithm
        self.layout = layout
        if not groups:
            raise ValueError("at least one parameter group is required")
        for t in layout.tensors:
            if not 0 <= t.group < len(groups):
                raise ValueError(
                    f"tensor {shown(t.name)}: group {t.group} does not exist "
                    f"(there are {len(groups)} groups)")
        self.groups: list[Hyperparameters] = [
            alg.resolve_hyperparameters(algorithm, g) for g in groups]
        if algorithm is Algorithm.MUON:
            muon.check_shapes(layout.tensors)
        if dtype not in STATE_DTYPES:
            raise ValueError(f"dtype: expected float32 or float64, got {dtype!r}")
        self.dtype = STATE_DTYPES[dtype]
        alg.check_accumulator_dtypes(algorithm, self.groups, self.dtype)  # optax's mu_dtype
        # the moments' precision (engine.moments): the master dtype's, bfloat16 or int8
        self.state_dtype = moments.check_state_dtype(state_dtype or dtype, dtype, algorithm)
        self.backend = backend if backend is not None else select_backend("cpu")
        self.schedule = schedule
        self.clip = clip
        self.skip_nonfinite = skip_nonfinite
        self.step_count = 0
        n = layout.size
        nseg = len(layout)
        self.seg_step = np.zeros(nseg, dtype=np.int64)
        self.mu_product = np.ones(nseg, dtype=np.float64)
        self.param: Array = self.backend.zeros(n, self.dtype)
        self.grad: Array = self.backend.zeros(n, self.dtype)
        if params is not None:
            self.param[...] = self.backend.to_device(np.asarray(params, dtype=self.dtype))
        self.slots: dict[str, Array] = {}
        self._slot_offsets: dict[str, I64] = {}
        self._ensure_slots()
        self._index_layout()

    def _index_layout(self) -> None:
        self._slot_offsets = {}
        self._blocks_all = make_blocks(self.backend, self.layout.offsets)
        self._seg_group = np.array([t.group for t in self.layout.tensors], dtype=np.int64)
        self._table_key = ""
        self._table_all: dict[str, F64] = {}

    def add_tensors(self, tensors: Sequence[TensorSpec], params: npt.NDArray[Any],
                    group: Mapping[str, Any] | None = None) -> None:
        """Append tensors (torch's ``add_param_group``): their step counts start at 0.

        ``group``: hyperparameters of a new parameter group the tensors join (their
        ``group`` fields must then name it); None: they join existing groups.
        Validates everything before it reallocates the flat buffers.
        """
        groups = list(self.groups)
        if group is not None:
            groups.append(alg.resolve_hyperparameters(self.algorithm, {**self._alias, **group}))
        alg.check_accumulator_dtypes(self.algorithm, groups[len(self.groups):], self.dtype)
        new_layout = Layout((*self.layout.tensors, *tensors))  # checks unique names
        for t in tensors:
            if not 0 <= t.group < len(groups):
                raise ValueError(f"tensor {shown(t.name)}: group {t.group} does not exist "
                                 f"(there are {len(groups)} groups)")
        if self.algorithm is Algorithm.MUON:
            muon.check_shapes(tensors)
        added = new_layout.size - self.layout.size
        if np.asarray(params).size != added:
            raise ValueError(f"expected {added} initial values for the new tensors, got "
                             f"{np.asarray(params).size}")
        old = self.layout.size

        def grown(buf: Array, tail: npt.NDArray[Any]) -> Array:
            out = self.backend.zeros(new_layout.size, self.dtype)
            out[:len(buf)] = buf  # device to device
            out[old:] = self.backend.to_device(np.asarray(tail, dtype=self.dtype))
            return out

        # everything is built aside first: an allocation failure changes nothing
        param = grown(self.param, params)
        grad = self.backend.zeros(new_layout.size, self.dtype)
        spec = alg.SPECS[self.algorithm]
        fresh = [s for h in groups for s in spec.slots(h) if s not in self.slots]
        new_offsets = {name: slot_offsets(self.algorithm, new_layout, name)
                       for name in (*self.slots, *fresh)}
        slots = {name: moments.grown(self.state_dtype, self.backend, name, buf,
                                     self.slot_offsets(name), new_offsets[name], self.dtype)
                 for name, buf in self.slots.items()}
        for name in dict.fromkeys(fresh):  # a slot the new group turns on, e.g. amsgrad
            slots[name] = moments.zeros(self.state_dtype, self.backend, name, new_offsets[name],
                                        self.dtype)
        nseg = len(new_layout)
        for name, buf in slots.items():  # e.g. Adagrad's initial accumulator
            first = 0 if name in fresh else nseg - len(tensors)
            for i in range(first, nseg):
                init = alg.initial_slot_value(self.algorithm, name,
                                              groups[new_layout.tensors[i].group])
                if init != 0.0:
                    buf[int(new_offsets[name][i]):int(new_offsets[name][i + 1])] = init
        self.param, self.grad, self.slots = param, grad, slots
        self.groups, self.layout = groups, new_layout
        self.seg_step = np.concatenate([self.seg_step, np.zeros(len(tensors), np.int64)])
        self.mu_product = np.concatenate([self.mu_product, np.ones(len(tensors))])
        self._index_layout()

    # -- state ---------------------------------------------------------------

    def slot_names(self) -> tuple[str, ...]:
        spec = alg.SPECS[self.algorithm]
        names: list[str] = []
        for h in self.groups:
            names.extend(s for s in spec.slots(h) if s not in names)
        return tuple(names)

    def group_slots(self, group: int) -> tuple[str, ...]:
        return alg.SPECS[self.algorithm].slots(self.groups[group])

    def _ensure_slots(self) -> None:
        """Allocate slots a (changed) hyperparameter now needs, e.g. momentum_buffer."""
        for name in self.slot_names():
            if name in self.slots:
                continue
            buf = moments.zeros(self.state_dtype, self.backend, name, self.slot_offsets(name),
                                self.dtype)
            for i, t in enumerate(self.layout.tensors):
                init = alg.initial_slot_value(self.algorithm, name, self.groups[t.group])
                if init != 0.0:
                    buf[self.slot_span(name, i)] = init
            self.slots[name] = buf

    # A slot's buffer holds each tensor's part of it in layout order; a part has the
    # tensor's shape but for Adafactor's factored statistics (the table's slot_shape),
    # and 0 elements where a tensor keeps no such slot.

    def slot_offsets(self, name: str) -> I64:
        """Where each tensor's part of slot ``name`` starts (``layout.offsets`` for a slot
        of the tensors' own shapes)."""
        offsets = self._slot_offsets.get(name)
        if offsets is None:
            offsets = self._slot_offsets[name] = slot_offsets(self.algorithm, self.layout, name)
        return offsets

    def slot_size(self, name: str) -> int:
        """Elements of slot ``name``'s buffer."""
        return int(self.slot_offsets(name)[-1])

    def slot_span(self, name: str, i: int) -> slice:
        offsets = self.slot_offsets(name)
        return slice(int(offsets[i]), int(offsets[i + 1]))

    def slot_shape(self, name: str, i: int) -> tuple[int, ...] | None:
        """The shape of tensor ``i``'s part of slot ``name`` (None: it keeps no such slot)."""
        return table.ALGORITHMS[self.algorithm.value].slot_shape(name, self.layout.tensors[i].shape)

    def slot_tensor(self, name: str, i: int) -> Array:
        """Tensor ``i``'s part of slot ``name``, in its shape (a view; a host copy of the
        dequantised values where the moments are narrow)."""
        shape = self.slot_shape(name, i)
        if shape is None:
            raise KeyError(f"tensor {shown(self.layout.tensors[i].name)} keeps no {name!r}")
        buf = self.slots[name]
        if moments.is_narrow(buf):
            buf = self.slot_values(name)
        return buf[self.slot_span(name, i)].reshape(shape)

    def slot_values(self, name: str) -> npt.NDArray[Any]:
        """Slot ``name``'s values on the host, dequantised where the moments are narrow
        (a view of the buffer on the CPU otherwise)."""
        return moments.values(self.slots[name], self.slot_offsets(name), self.backend)

    def slot_native(self, name: str) -> dict[str, npt.NDArray[Any]]:
        """Slot ``name`` as stored, on the host, by part (``""``: a plain slot's array;
        a narrow one's codes, scales, ...: :func:`adamserve.engine.quantize.parts`)."""
        return moments.native(self.slots[name], self.backend)

    def set_slot_native(self, name: str, parts: dict[str, npt.NDArray[Any]]) -> None:
        """Replace slot ``name`` by its stored form (a checkpoint's); ValueError when the
        parts do not fit the layout or the state dtype."""
        self.slots[name] = moments.from_native(self.state_dtype, self.backend, name,
                                               self.slot_offsets(name), parts, self.dtype)

    def set_slot_values(self, name: str, host: npt.NDArray[Any]) -> None:
        """Replace slot ``name``'s values (quantised where the moments are narrow)."""
        buf = self.slots.get(name)
        if buf is not None and not moments.is_narrow(buf):
            buf[...] = self.backend.to_device(np.asarray(host, dtype=self.dtype))
            return
        self.slots[name] = moments.from_values(self.state_dtype, self.backend, name,
                                               self.slot_offsets(name), host, like=buf)

    def slot_bytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of the slot buffers ``names`` (default: those held), as stored."""
        if names is None:
            return sum(moments.nbytes(buf) for buf in self.slots.values())
        return sum(moments.nbytes(self.slots[n]) if n in self.slots else
                   moments.moment_bytes(self.state_dtype, self.slot_offsets(n)) for n in names)

    def slots_after(self, group: int, changes: Mapping[str, Any]) -> tuple[str, ...]:
        """The slots the optimizer would hold after ``set_hyperparameters`` (validates)."""
        new, _ = self._changed(group, changes)
        spec = alg.SPECS[self.algorithm]
        names = list(self.slots)
        for h in [*self.groups[:group], new, *self.groups[group + 1:]]:
            names.extend(s for s in spec.slots(h) if s not in names)
        return tuple(names)

    def slots_after_group(self, group: Mapping[str, Any] | None) -> tuple[str, ...]:
        """The slots the optimizer would hold with one more group ``group`` (validates)."""
        if group is None:
            return tuple(self.slots)
        new = alg.resolve_hyperparameters(self.algorithm, {**self._alias, **group})
        names = list(self.slots)
        names.extend(s for s in alg.SPECS[self.algorithm].slots(new) if s not in names)
        return tuple(names)

    def set_hyperparameters(self, group: int, changes: Mapping[str, Any]) -> None:
        """Change hyperparameters of one group; takes effect at the next step.

        Schedule-free: ``train_mode`` switches the group's parameters (of the tensors
        that have a z) between y (true: ``train()``) and x (false: ``eval()``) at once,
        with the group's beta1 after the other changes of the same call.
        """
        new, weight = self._changed(group, changes)
        if weight is not None:
            self.swap(group, weight)
        self.groups[group] = new
        self._ensure_slots()

    def _changed(self, group: int, changes: Mapping[str, Any]) -> tuple[
            Hyperparameters, float | None]:
        """Group ``group`` after ``changes`` (validated), and the lerp weight of the
        train()/eval() swap they call for (None: none)."""
        if not 0 <= group < len(self.groups):
            raise ValueError(f"group {group} does not exist (there are {len(self.groups)})")
        alg.state_changes(self.algorithm, changes)
        old = self.groups[group]
        new = alg.resolve_hyperparameters(self.algorithm, changes, base=old)
        alg.check_accumulator_dtypes(self.algorithm, [new], self.dtype)
        if self.algorithm not in alg.SCHEDULE_FREE or new["train_mode"] == old["train_mode"]:
            return new, None
        if not (self.seg_step[self._seg_group == group] > 0).any():
            return new, None  # no tensor has a z yet: only the flag changes, as in schedulefree
        return new, alg.swap_weight(new, bool(new["train_mode"]), group)

    def swap(self, group: int, weight: float) -> None:
        """p = lerp(p, z, weight) for the tensors of ``group`` that have a z (torch's lerp)."""
        mask = (self._seg_group == group) & (self.seg_step > 0)
        if not mask.any():
            return
        blocks = make_blocks(self.backend, self.layout.offsets, mask)
        coef = np.zeros((len(self.layout), 2))
        coef[:, 0], coef[:, 1] = weight, 1.0
        self.backend.lerp_into(self.param, self.slots["z"], blocks,
                               self.backend.to_device(coef.astype(self.dtype)))

    # -- step ----------------------------------------------------------------

    def _segment_values(self, active: BoolArray | None) -> dict[str, F64]:
        """Hyperparameters spread over the (active) segments; cached until they change."""
        key = repr(self.groups)
        if self._table_key != key:
            keys = self.groups[0].keys()
            table = {k: np.array([float(h[k]) for h in self.groups]) for k in keys}
            self._table_all = {k: v[self._seg_group] for k, v in table.items()}
            self._table_key = key
        if active is None:
            return dict(self._table_all)
        return {k: v[active] for k, v in self._table_all.items()}

    def current_lr(self, group: int) -> float:
        base = alg.base_lr(self.algorithm, self.groups[group])  # lr, optax's learning_rate
        return base if self.schedule is None else self.schedule.lr(self.step_count, base)

    def _scheduled(self, values: dict[str, F64]) -> None:
        spec = alg.SPECS[self.algorithm]  # its lr_key (optax's learning_rate) and beta1_key
        values[spec.lr_key] = alg.lr_values(self.algorithm, values)
        if self.schedule is None:
            return
        s, t = self.schedule, self.step_count
        values[spec.lr_key] = np.array([s.lr(t, float(x)) for x in values[spec.lr_key]])
        if spec.beta1_key in values:
            values[spec.beta1_key] = np.array([s.beta1(t, float(x))
                                               for x in values[spec.beta1_key]])

    def step(self, active: BoolArray | None = None, grad_sumsq: F64 | None = None, *,
             lr_scale: float = 1.0, total_sumsq: float | None = None,
             grad: Array | None = None,
             rows: Sequence[npt.NDArray[np.int64] | None] | None = None) -> StepReport:
        """Apply one update from ``self.grad`` to the tensors marked ``active`` (default all).

        A step whose active gradients hold NaN or Inf (with ``skip_nonfinite``) changes
        nothing, not even the step counters, and reports which tensors were at fault.
        ``grad_sumsq`` (per segment, when the caller computed it while filling the
        gradient buffer) saves the reduction pass. ``lr_scale`` multiplies every
        group's (scheduled) lr for this step. ``total_sumsq``: the squared norm of the
        whole gradient when this optimizer holds only part of it (a shard); then
        ``grad_sumsq`` holds each segment's whole-tensor sum of squares. ``grad``: the
        gradient, when it is not in ``self.grad`` (LAMB writes its update over it).
        ``rows`` (SparseAdam's; ignored by the others, whose callers zero the rows not
        sent): per tensor in layout order, the sorted, distinct rows along dim 0 whose
        gradient was written, None for all of them; the other rows' gradient is never
        read and their state never changes (:mod:`adamserve.engine.sparse_adam`).
        ``grad_sumsq`` then sums the given rows only.
        """
        prepared = self._prepare(active, grad_sumsq, lr_scale, total_sumsq, grad, rows)
        if isinstance(prepared, StepReport):
            return prepared
        if self.algorithm is Algorithm.LAMB:
            lamb = LambStep(self, prepared, in_place=True)
            return lamb.finish(lamb.param_sumsq, lamb.update_sumsq)
        if self.algorithm is Algorithm.MUON:
            return muon.muon_step(self, prepared)
        if self.algorithm is Algorithm.ADAFACTOR:
            from adamserve.engine.adafactor import adafactor_step  # it imports this module

            return adafactor_step(self, prepared)
        if self.algorithm is Algorithm.OPTAX_LAMB:
            from adamserve.engine.optax_lamb import optax_lamb_step  # it imports this module

            return optax_lamb_step(self, prepared)
        if self.algorithm is Algorithm.OPTAX_ADAFACTOR:
            from adamserve.engine.optax_adafactor import optax_adafactor_step

            return optax_adafactor_step(self, prepared)
        if len(prepared.idx):
            self.backend.run(self.algorithm.value, self.slots, self.param, prepared.grad,
                             prepared.blocks, prepared.coef)
        self._advance(prepared.h, prepared.idx)
        return StepReport(self.step_count, False, prepared.grad_norm)

    def begin_lamb(self, active: BoolArray | None = None, grad_sumsq: F64 | None = None, *,
                   lr_scale: float = 1.0, total_sumsq: float | None = None,
                   grad: Array | None = None) -> LambStep | StepReport:
        """LAMB's step up to the trust ratio, for a shard whose tensors are parts of
        larger ones: the new moments go to scratch buffers and the state is untouched
        until :meth:`LambStep.finish` gets the whole tensors' norms. A skipped step
        returns its report."""
        if self.algorithm is not Algorithm.LAMB:
            raise ValueError(f"begin_lamb: the optimizer runs {self.algorithm.value}, not lamb")
        prepared = self._prepare(active, grad_sumsq, lr_scale, total_sumsq, grad)
        if isinstance(prepared, StepReport):
            return prepared
        return LambStep(self, prepared, in_place=False)

    def _prepare(self, active: BoolArray | None, grad_sumsq: F64 | None, lr_scale: float,
                 total_sumsq: float | None, grad: Array | None,
                 rows: sparse_adam.Rows | None = None) -> _Prepared | StepReport:
        """The non-finite check, clipping and this step's coefficients."""
        self._require_train_mode()
        g = self.grad if grad is None else grad
        nseg = len(self.layout)
        if active is None:
            active_mask = np.ones(nseg, dtype=bool)
        else:
            active_mask = np.asarray(active, dtype=bool)
            if active_mask.shape != (nseg,):
                raise ValueError(f"active: expected {nseg} flags (one per tensor), got shape "
                                 f"{list(active_mask.shape)}")
        if self.algorithm is Algorithm.SPARSE_ADAM:  # only the given rows are read
            blocks = sparse_adam.step_blocks(
                self.backend, self.layout, None if active is None else active_mask, rows,
                self._blocks_all)
        elif active is None:
            blocks = self._blocks_all
        else:
            blocks = make_blocks(self.backend, self.layout.offsets, active_mask)
        idx = np.flatnonzero(active_mask)
        need_norms = self.skip_nonfinite or self.clip.max_norm is not None
        gscale = np.ones(len(idx))
        grad_norm: float | None = None
        if need_norms and len(idx):
            if grad_sumsq is None:
                grad_sumsq = self.backend.segment_sumsq(g, blocks, nseg)
            sumsq = grad_sumsq[idx]
            bad = ~np.isfinite(sumsq)
            if self.skip_nonfinite and (bad.any() or (
                    total_sumsq is not None and not np.isfinite(total_sumsq))):
                names = tuple(self.layout.tensors[int(i)].name for i in idx[bad])
                return StepReport(self.step_count, True, float("nan"), names)
            gscale, grad_norm = alg.clip_coefficients(
                sumsq, self.clip.max_norm, self.clip.per_tensor, total_sumsq)
        h, coef64 = self._coefficients(None if active is None else active_mask, idx, gscale,
                                       lr_scale)
        coef = self.backend.to_device(coef64.astype(self.dtype))
        return _Prepared(blocks, idx, h, coef64, coef, grad_norm, g)

    def _coefficients(self, active: BoolArray | None, idx: I64, gscale: F64,
                      lr_scale: float = 1.0) -> tuple[alg.SegmentHyper, F64]:
        """This step's hyperparameters of the active segments, and the full coefficient matrix."""
        if self.algorithm in alg.SCHEDULE_FREE:
            return self._schedule_free_coefficients(idx, gscale, lr_scale)
        values = self._segment_values(active)
        self._scheduled(values)
        lr_key = alg.SPECS[self.algorithm].lr_key
        if lr_scale != 1.0:
            values[lr_key] = values[lr_key] * lr_scale
        h = alg.SegmentHyper(values, self.seg_step[idx] + 1, self.mu_product[idx],
                             dtype=self.dtype)  # optax's rows compute in the session's dtype
        coef_rows = alg.coefficients(self.algorithm, h, values[lr_key], gscale)
        coef64 = np.zeros((len(self.layout), coef_rows.shape[1]), dtype=np.float64)
        coef64[idx] = coef_rows
        return h, coef64

    def _schedule_free_coefficients(self, idx: I64, gscale: F64, lr_scale: float) -> tuple[
            alg.SegmentHyper, F64]:
        """The schedule-free step: every group's scalars (each group steps, with or
        without gradients, as in schedulefree) spread over the active segments; z starts
        as y in a segment's first step."""
        per_group = [alg.schedule_free_group(self.algorithm, h, self.current_lr(g) * lr_scale, g)
                     for g, h in enumerate(self.groups)]
        step = self.seg_step[idx] + 1
        rows = alg.schedule_free_coefficients([s for s, _ in per_group], self._seg_group[idx],
                                              gscale, step == 1)
        coef64 = np.zeros((len(self.layout), rows.shape[1] + 1), dtype=np.float64)
        coef64[:, -1] = 1.0  # the kernels' one in the state dtype
        coef64[idx, :-1] = rows
        h = alg.SegmentHyper({}, step, self.mu_product[idx], [a for _, a in per_group])
        return h, coef64

    def _require_train_mode(self) -> None:
        """schedulefree refuses a step unless group 0 is in train mode; so do we."""
        if self.algorithm in alg.SCHEDULE_FREE and not self.groups[0]["train_mode"]:
            raise FailedPrecondition(
                "Optimizer was not in train mode when step is called (param group 0 has "
                "train_mode false): switch it to train mode (the client's train(), or "
                "SetHyperparameters with the flag train_mode true) before stepping, and to "
                "eval mode (eval()) before evaluating; nothing was applied")

    def _advance(self, h: alg.SegmentHyper, idx: I64) -> None:
        if self.algorithm is Algorithm.NADAM:
            self.mu_product[idx] *= alg.nadam_mu(h)
        if h.group_state is not None:
            for g, after in enumerate(h.group_state[:len(self.groups)]):
                self.groups[g] = {**self.groups[g], **after}
        self.seg_step[idx] += 1
        self.step_count += 1

    @property
    def streamable(self) -> bool:
        """Whether a step can be applied piece by piece as gradients arrive: only when it
        needs no quantity over whole tensors or the whole gradient, and its moments are
        not int8 (whose blocks of 256 a range would cut)."""
        return (self.state_dtype != "int8" and self.algorithm not in (Algorithm.LAMB, Algorithm.ADAFACTOR, Algorithm.MUON,
                                       Algorithm.SPARSE_ADAM,  # its ranges are its rows
                                       Algorithm.OPTAX_LAMB, Algorithm.OPTAX_ADAFACTOR)
                and self.clip.max_norm is None and not self.skip_nonfinite)

    def begin_stream(self) -> StreamStep:
        """Start a step applied range by range (see :class:`StreamStep`)."""
        if not self.streamable:
            raise ValueError(
                "this step needs whole-gradient quantities (LAMB's trust ratio, Adafactor's "
                "norms, clipping norms or the non-finite check) and cannot be applied as "
                "gradients arrive")
        self._require_train_mode()
        return StreamStep(self)

    # -- views ---------------------------------------------------------------

    def tensor(self, buf: Array, i: int) -> Array:
        t = self.layout.tensors[i]
        return buf[self.layout.span(i)].reshape(t.shape)


@dataclass(frozen=True)
class _Prepared:
    """A step past its checks: the blocks, segments and coefficients it will run with."""

    blocks: Blocks
    idx: I64
    h: alg.SegmentHyper
    coef64: F64
    coef: Array
    grad_norm: float | None
    grad: Array  # the gradient the step reads


class LambStep:
    """LAMB's two passes split at the trust ratio.

    The first pass (in the constructor) updates the moments and writes the update
    ``r`` over a gradient buffer, summing ``||p||^2`` and ``||r||^2`` per segment.
    :meth:`finish` takes those sums over whole tensors (a shard adds up the parts
    held by every shard) and applies ``p -= lr * trust_ratio * r``. With
    ``in_place=False`` the first pass writes to scratch copies, so the optimizer's
    state is unchanged until ``finish``.
    """

    def __init__(self, opt: FlatOptimizer, prepared: _Prepared, *, in_place: bool) -> None:
        self.opt = opt
        self.prepared = prepared
        nseg = len(opt.layout)
        if in_place:
            self.slots, self.update = opt.slots, prepared.grad
        else:
            self.slots = {k: moments.copy(v) for k, v in opt.slots.items()}
            self.update = prepared.grad.copy()
        blocks = prepared.blocks
        psq_b, rsq_b = opt.backend.lamb_moments(self.slots, opt.param, self.update, blocks,
                                                prepared.coef)
        self.param_sumsq = np.bincount(blocks.host_seg, weights=psq_b,
                                       minlength=nseg).astype(np.float64)
        self.update_sumsq = np.bincount(blocks.host_seg, weights=rsq_b,
                                        minlength=nseg).astype(np.float64)

    def finish(self, param_sumsq: F64, update_sumsq: F64) -> StepReport:
        """Apply the update with trust ratios from whole-tensor sums of squares."""
        opt, prepared = self.opt, self.prepared
        lr = prepared.coef64[:, alg.LAMB_LR_COLUMN]
        scale = lr * alg.lamb_trust_ratio(np.asarray(param_sumsq, np.float64),
                                          np.asarray(update_sumsq, np.float64))
        if len(prepared.idx):
            opt.backend.scaled_sub(opt.param, self.update, prepared.blocks,
                                   opt.backend.to_device(scale.astype(opt.dtype)))
        if opt.slots is not self.slots:  # the new moments, once the update is in
            opt.slots.update(self.slots)
        opt._advance(prepared.h, prepared.idx)
        return StepReport(opt.step_count, False, prepared.grad_norm)


class StreamStep:
    """One step of an elementwise algorithm, applied range by range as gradients arrive.

    The coefficients of every tensor are fixed when the step begins; ``apply`` runs the
    fused kernel over one contiguous range of one tensor's elements (whose gradient is
    already in ``opt.grad``); ``finish`` advances the step counts of the tensors it
    touched. Applying every range of a tensor once equals one ordinary ``step``.
    """

    def __init__(self, opt: FlatOptimizer) -> None:
        self.opt = opt
        nseg = len(opt.layout)
        self.idx = np.arange(nseg, dtype=np.int64)
        self.h, coef64 = opt._coefficients(None, self.idx, np.ones(nseg))
        self.coef = opt.backend.to_device(coef64.astype(opt.dtype))
        self.touched = np.zeros(nseg, dtype=bool)

    def apply(self, seg: int, lo: int, hi: int) -> None:
        """Update flat elements ``[lo, hi)``, which lie inside tensor ``seg``."""
        opt = self.opt
        if not opt.layout.offsets[seg] <= lo <= hi <= opt.layout.offsets[seg + 1]:
            raise ValueError(f"range [{lo}, {hi}) is not inside tensor {seg}")
        if hi == lo:
            return
        start = np.arange(lo, hi, opt.backend.block, dtype=np.int64)
        end = np.minimum(start + opt.backend.block, hi)
        segs = np.full(start.shape, seg, dtype=np.int64)
        blocks = Blocks(opt.backend.to_device(start), opt.backend.to_device(end),
                        opt.backend.to_device(segs), segs, hi - lo)
        opt.backend.run(opt.algorithm.value, opt.slots, opt.param, opt.grad, blocks, self.coef)
        self.touched[seg] = True

    def finish(self) -> StepReport:
        sel = self.touched
        if not sel.any():
            return StepReport(self.opt.step_count, False, None)
        h = alg.SegmentHyper({k: v[sel] for k, v in self.h.values.items()}, self.h.step[sel],
                             self.h.mu_product[sel], self.h.group_state)
        self.opt._advance(h, self.idx[sel])
        return StepReport(self.opt.step_count, False, None)
