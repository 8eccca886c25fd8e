"""The algorithms a session can run, as data: the one table of names and defaults.

One row per name a client may ask for. ``runs``: the server algorithm that does the
maths (``amsgrad`` runs Adam with ``amsgrad=True``: its ``options``). ``defaults``:
the hyperparameters under torch.optim's names (``betas`` a pair), with torch.optim's
defaults exactly as its constructors write them (``weight_decay=0`` where torch
writes ``0``), in the order the server lists them; LAMB, which torch lacks, takes
optax.lamb's (the paper's). ``extras``: what the server accepts beyond torch's class
(Adam's ``bias_correction``), with the server's default; torch's param groups do not
carry them. ``torch_class``: torch.optim's class of that algorithm, and ``switches``:
which of torch's implementation switches (:data:`SWITCHES`) that class takes. A row
that follows a class outside torch.optim names it in ``oracle`` (the schedule-free
pair: ``schedulefree.AdamWScheduleFree``), with its switches' defaults where they
differ from torch's (``switch_defaults``: schedulefree's ``foreach=True``).
``group_state``: what such a class keeps per parameter group beside the
hyperparameters (schedulefree's step count ``k``, ``train_mode``, ...), with its
initial values: exported and imported with the groups, never a constructor argument
nor sent as a hyperparameter. ``integers``: the keys whose values are whole numbers
(exported as ints, as the oracle keeps them). ``nullable``: the numbers that may be None
(the oracle's default for some, torch.optim.Adafactor's eps1, optax.adafactor's
learning_rate), and ``required``: the arguments the oracle's constructor requires (no
default there; the table's value is the server's when a group leaves the key out).
``slot_shapes``: a state slot's shape from the tensor's shape and its group's
hyperparameters (the Adafactors' factored statistics; the session lays its slots out
with the row's defaults).

Two semantics (:data:`SEMANTICS`, :func:`qualified`): torch's rows are keyed by their
names ("adam"); optax's by ``"optax.<alias>"`` ("optax.adam", ..., "optax.adafactor"),
each with optax 0.2's argument names and defaults exactly as its alias writes them
(``learning_rate``, ``b1``, ``b2``, ``eps``, ``eps_root``, ``mu_dtype``, ``nesterov``,
...; ``oracle`` the alias, no torch class, no switches). ``optax.nadam`` and
``optax.nadamw`` run optax.adam and optax.adamw with ``nesterov=True`` (optax's own
``functools.partial``). A dtype (``mu_dtype``, Adafactor's ``dtype_momentum``) is a
choice by name: None, "float32" or "float64". optax's masks and callables (schedules
as the learning rate) are not table values: a server schedule scales the learning rate
instead (docs/optax.md).

Also how a hyperparameter and a group travel: :func:`wire_value` (true/false, a
float, betas a pair, a choice's name or None) and :func:`split_betas` /
:func:`join_betas` (torch's tuples <-> their members, :data:`TUPLES`: ``betas`` <->
the wire's ``beta1`` and ``beta2``, Muon's ``ns_coefficients`` <-> ``ns_a``, ``ns_b``,
``ns_c``). A key of :data:`CHOICES` (Muon's ``adjust_lr_fn``) names one of a few
strings, or is None: the wire's Group carries the name in ``names`` and None in
``unset``.

Plain Python, importable by both sides, so that each default is written once: the
server's engine (``adamserve.engine.algorithms``) derives its specs from it, and the
client (``adamserve_client.optim``) its generic defaults, the default arguments of
its torch-signature classes and the switches each refuses
(``adamserve_client.validation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ALGORITHMS", "CHOICES", "INTEGER_KEYS", "NULLABLE", "OPTAX_DTYPES", "OPTAX_ROWS",
           "SEMANTICS", "SWITCHES", "TUPLES", "AlgorithmDef", "SlotShapes", "WireValue",
           "join_betas", "optax_factored_dims", "qualified", "split_betas", "wire_value"]

# A hyperparameter as the wire carries it: true/false, a number, betas as a pair, or a
# choice's name or None (CHOICES).
WireValue = bool | float | str | None | tuple[float | None, ...]

# torch's hyperparameters that are tuples, and the keys their members travel under.
TUPLES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "betas": ("beta1", "beta2"), "ns_coefficients": ("ns_a", "ns_b", "ns_c"),
    "eps": ("eps1", "eps2")})  # a pair for Adafactor only (a number elsewhere)
# The dtypes optax's accumulators may be given (mu_dtype, dtype_momentum): None (the
# parameters') or the session's master dtype; bfloat16 moments are the session's
# state_dtype instead.
OPTAX_DTYPES: tuple[str | None, ...] = (None, "float32", "float64")
# Hyperparameters that name one of a few choices, torch's None among them (the engine
# keeps the choice's index in this tuple).
CHOICES: Mapping[str, tuple[str | None, ...]] = MappingProxyType({
    "adjust_lr_fn": (None, "original", "match_rms_adamw"),
    "mu_dtype": OPTAX_DTYPES, "dtype_momentum": OPTAX_DTYPES})


def wire_value(key: str, value: Any) -> WireValue:
    """A hyperparameter as the wire carries it: true/false (Python's or NumPy's bool), a
    number (an int, a float, a one-element tensor) as a float, betas (a pair, list or
    tuple) as a tuple of floats (None kept), a string or None for a key of
    :data:`CHOICES` (the server checks the name), None for a key of :data:`NULLABLE`;
    ValueError naming ``key`` for anything else."""
    try:
        if key in CHOICES and (value is None or isinstance(value, str)):
            return value
        if value is None and key in NULLABLE:
            return None
        if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
            return bool(value)
        if isinstance(value, list | tuple):
            return tuple(None if v is None else float(v) for v in value)
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"hyperparameter {key!r}: expected a number, true/false or a pair of "
                         f"numbers, got {value!r}") from None


def split_betas(group: Mapping[str, Any]) -> dict[str, bool | float | str | None]:
    """A group under torch's names (its :data:`TUPLES`, ``betas`` a pair) under the
    wire's: ``beta1`` and ``beta2`` where ``betas`` stood (``ns_a``, ``ns_b``, ``ns_c``
    for ``ns_coefficients``), numbers as floats, true/false, strings and None kept;
    ValueError for another tuple."""
    out: dict[str, bool | float | str | None] = {}
    for key, value in group.items():
        if isinstance(value, tuple | list):
            members = TUPLES.get(key, ())
            if len(value) != len(members) or not members:
                raise ValueError(f"hyperparameter {key!r}: only betas and eps (Adafactor's) "
                                 f"may be a pair and ns_coefficients a triple, got {value!r}")
            for member, v in zip(members, value, strict=True):
                out[member] = None if v is None else float(v)
        elif isinstance(value, bool | str) or value is None:
            out[key] = value
        else:
            out[key] = float(value)
    return out


def join_betas(group: Mapping[str, Any]) -> dict[str, Any]:
    """The wire's names back under torch's: ``beta1`` and ``beta2`` as the pair ``betas``
    (where ``beta1`` stood; one without the other is kept as it is), each of
    :data:`TUPLES` alike, the rest unchanged."""
    joined = {members[0]: (name, members) for name, members in TUPLES.items()
              if all(m in group for m in members)}
    inside = {m for _, members in joined.values() for m in members}
    out: dict[str, Any] = {}
    for key, value in group.items():
        if key in joined:
            name, members = joined[key]
            out[name] = tuple(None if group[m] is None else float(group[m]) for m in members)
        elif key not in inside:
            out[key] = value
    return out


# torch.optim's implementation switches, with torch's defaults: they pick an
# implementation, not the maths, so they stay in the client's param groups (its
# state_dicts look like torch's) and never travel.
SWITCHES: Mapping[str, Any] = MappingProxyType({
    "foreach": None, "fused": None, "capturable": False, "differentiable": False,
})
_ALL_SWITCHES = frozenset(SWITCHES)

# A slot's shape for a tensor's shape and its group's hyperparameters (None: no such slot).
SlotShapes = Callable[[str, tuple[int, ...], Mapping[str, Any]], tuple[int, ...] | None]


@dataclass(frozen=True)
class AlgorithmDef:
    """One name a session may be created with (see the module docstring)."""

    name: str
    runs: str
    defaults: Mapping[str, Any]
    extras: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    torch_class: str | None = None  # torch.optim's class of that name (LAMB: none)
    switches: frozenset[str] = _ALL_SWITCHES  # the switches (SWITCHES) that class takes
    oracle: str | None = None  # "package.Class" outside torch.optim the row follows
    switch_defaults: Mapping[str, Any] = field(default_factory=dict)  # where not SWITCHES'
    group_state: Mapping[str, Any] = field(default_factory=dict)  # per-group state, initial
    integers: frozenset[str] = frozenset()  # whole-number keys (hyperparameters or state)
    # the shape of a slot for a tensor's shape and its group's hyperparameters (None: no
    # such slot); None: the tensor's own
    slot_shapes: SlotShapes | None = None
    nullable: frozenset[str] = frozenset()  # numbers that may be None
    required: frozenset[str] = frozenset()  # the oracle's arguments without a default

    def __post_init__(self) -> None:
        for name in ("defaults", "extras", "options", "switch_defaults", "group_state"):
            # read-only: both sides share them
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def class_name(self) -> str | None:
        """The name of the class the row follows (torch.optim's, or the oracle's)."""
        return self.torch_class or (self.oracle.rpartition(".")[2] if self.oracle else None)

    def switch_default(self, name: str) -> Any:
        """The default of switch ``name`` in the class the row follows."""
        return self.switch_defaults.get(name, SWITCHES[name])

    def slot_shape(self, slot: str, shape: tuple[int, ...],
                   group: Mapping[str, Any] | None = None) -> tuple[int, ...] | None:
        """The shape of state ``slot`` of a tensor of ``shape`` in a group of hyperparameters
        ``group`` (None: the defaults) (None: it keeps no such slot): the tensor's own,
        but for Adafactor's factored statistics."""
        shape = tuple(shape)
        if self.slot_shapes is None:
            return shape
        return self.slot_shapes(slot, shape, self.defaults if group is None else group)

    @property
    def keys(self) -> frozenset[str]:
        """Every hyperparameter the server accepts for it, under torch's names."""
        return frozenset(self.defaults) | frozenset(self.extras)

    def wire_defaults(self, extras: bool = True) -> dict[str, WireValue]:
        """The defaults (with the extras, unless told not to) as the wire carries them."""
        given = {**self.defaults, **self.extras} if extras else self.defaults
        return {k: wire_value(k, v) for k, v in given.items()}

    def alias(self, name: str, **options: Any) -> AlgorithmDef:
        """Another name for this algorithm with ``options`` set."""
        return dataclasses.replace(self, name=name, defaults={**self.defaults, **options},
                                   options=options)


_ADAM_FAMILY: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "maximize": False,
}
_BIAS_CORRECTION = {"bias_correction": True}

_NO_FUSED = _ALL_SWITCHES - {"fused"}

ADAM = AlgorithmDef("adam", "adam", {
    **_ADAM_FAMILY, "amsgrad": False, "decoupled_weight_decay": False,
}, extras=_BIAS_CORRECTION, torch_class="Adam")
ADAMW = AlgorithmDef("adamw", "adamw", {
    **_ADAM_FAMILY, "weight_decay": 1e-2, "amsgrad": False, "decoupled_weight_decay": True,
}, extras=_BIAS_CORRECTION, torch_class="AdamW")
NADAM = AlgorithmDef("nadam", "nadam", {
    **_ADAM_FAMILY, "lr": 2e-3, "momentum_decay": 4e-3, "decoupled_weight_decay": False,
}, torch_class="NAdam", switches=_NO_FUSED)
RADAM = AlgorithmDef("radam", "radam", {**_ADAM_FAMILY, "decoupled_weight_decay": False},
                     torch_class="RAdam", switches=_NO_FUSED)
ADAMAX = AlgorithmDef("adamax", "adamax", {**_ADAM_FAMILY, "lr": 2e-3}, torch_class="Adamax",
                      switches=_NO_FUSED)
ADAGRAD = AlgorithmDef("adagrad", "adagrad", {
    "lr": 1e-2, "lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0,
    "eps": 1e-10, "maximize": False,
}, torch_class="Adagrad", switches=_ALL_SWITCHES - {"capturable"})
RMSPROP = AlgorithmDef("rmsprop", "rmsprop", {
    "lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0, "momentum": 0,
    "centered": False, "maximize": False,
}, torch_class="RMSprop", switches=_NO_FUSED)
# optax.lamb: b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0 (lr has no default there)
LAMB = AlgorithmDef("lamb", "lamb", {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "maximize": False,
    "bias_correction": True,
})

# facebookresearch's schedulefree 1.4.1, whose constructors write these defaults (and
# check nothing); its param groups carry the per-group state below.
_SCHEDULE_FREE: dict[str, Any] = {
    "lr": 0.0025, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
}
_SCHEDULE_FREE_STATE = {
    "k": 0, "train_mode": False, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0,
}
_FOREACH_ONLY = frozenset({"foreach"})
ADAMW_SCHEDULE_FREE = AlgorithmDef("adamw_schedule_free", "adamw_schedule_free", {
    **_SCHEDULE_FREE, "warmup_steps": 0, "r": 0.0, "weight_lr_power": 2.0,
}, oracle="schedulefree.AdamWScheduleFree", switches=_FOREACH_ONLY,
    switch_defaults={"foreach": True}, group_state=_SCHEDULE_FREE_STATE,
    integers=frozenset({"warmup_steps", "k"}))
RADAM_SCHEDULE_FREE = AlgorithmDef("radam_schedule_free", "radam_schedule_free", {
    **_SCHEDULE_FREE, "r": 0.0, "weight_lr_power": 2.0, "silent_sgd_phase": True,
}, oracle="schedulefree.RAdamScheduleFree", switches=_FOREACH_ONLY,
    switch_defaults={"foreach": True}, group_state=_SCHEDULE_FREE_STATE,
    integers=frozenset({"k"}))



def _adafactor_slot_shape(slot: str, shape: tuple[int, ...],
                          group: Mapping[str, Any]) -> tuple[int, ...] | None:
    """torch.optim.Adafactor's state: a tensor of two dims or more keeps the row and
    column means of g² over its last two dims (the leading ones are a batch), one of
    fewer the elementwise ``variance``."""
    if len(shape) >= 2:
        return {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}.get(slot)
    return shape if slot == "variance" else None


# torch.optim.Adafactor (torch 2.13): eps is the pair (eps1, eps2), eps1 None standing for
# the dtype's machine epsilon; its only switch is foreach.
ADAFACTOR = AlgorithmDef("adafactor", "adafactor", {
    "lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0,
    "maximize": False,
}, torch_class="Adafactor", switches=frozenset({"foreach"}),
    slot_shapes=_adafactor_slot_shape, nullable=frozenset({"eps1"}))

# torch.optim.Muon (torch 2.13), for 2-D parameters: it takes none of torch's switches.
MUON = AlgorithmDef("muon", "muon", {
    "lr": 1e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True,
    "ns_coefficients": (3.4445, -4.7750, 2.0315), "eps": 1e-7, "ns_steps": 5,
    "adjust_lr_fn": None,
}, torch_class="Muon", switches=frozenset(), integers=frozenset({"ns_steps"}))

# torch.optim.SparseAdam (torch 2.13): Adam's moments and update on the rows a sparse
# gradient touches only (lazily); it takes none of torch's switches, nor weight decay.
SPARSE_ADAM = AlgorithmDef("sparse_adam", "sparse_adam", {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": False,
}, torch_class="SparseAdam", switches=frozenset())

# -- optax 0.2 (semantics "optax"): each alias's arguments, names and defaults as optax
# writes them, but its masks (out of scope); learning_rate, which optax requires (but
# Adafactor's), takes 1e-3 where a group leaves it out.

_NO_SWITCHES: frozenset[str] = frozenset()
_LEARNING_RATE = frozenset({"learning_rate"})


def _optax(alias: str, defaults: Mapping[str, Any], required: frozenset[str] = _LEARNING_RATE,
           **more: Any) -> AlgorithmDef:
    return AlgorithmDef(f"optax.{alias}", f"optax.{alias}", defaults, oracle=f"optax.{alias}",
                        switches=_NO_SWITCHES, required=required, **more)


def _optax_alias(row: AlgorithmDef, alias: str, **options: Any) -> AlgorithmDef:
    """optax's ``functools.partial`` of an alias (nadam = adam with nesterov=True)."""
    return dataclasses.replace(row.alias(f"optax.{alias}", **options), oracle=f"optax.{alias}")


_OPTAX_ADAM_ARGS: dict[str, Any] = {
    "learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0}

OPTAX_ADAM = _optax("adam", {**_OPTAX_ADAM_ARGS, "mu_dtype": None, "nesterov": False})
OPTAX_ADAMW = _optax("adamw", {**_OPTAX_ADAM_ARGS, "mu_dtype": None, "weight_decay": 1e-4,
                               "nesterov": False})
OPTAX_AMSGRAD = _optax("amsgrad", {**_OPTAX_ADAM_ARGS, "mu_dtype": None,
                                   "bias_correction_mu": True, "bias_correction_nu": True})
OPTAX_RADAM = _optax("radam", {**_OPTAX_ADAM_ARGS, "threshold": 5.0, "nesterov": False})
OPTAX_ADAMAX = _optax("adamax", {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8})
OPTAX_LAMB = _optax("lamb", {**_OPTAX_ADAM_ARGS, "eps": 1e-6, "weight_decay": 0.0})


def optax_factored_dims(shape: tuple[int, ...], group: Mapping[str, Any]) -> tuple[int, int] | None:
    """optax.adafactor's ``_factored_dims``: the axes (d1, d0) of a tensor's second largest
    and largest dims, where ``factored`` is on and the second largest is at least
    ``min_dim_size_to_factor``; None (an unfactored second moment) otherwise. Ties keep
    the axes' order, as numpy's argsort does for up to 16 dims."""
    if not group["factored"] or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=shape.__getitem__)
    if shape[order[-2]] < group["min_dim_size_to_factor"]:
        return None
    return order[-2], order[-1]


def _optax_adafactor_slot_shape(slot: str, shape: tuple[int, ...],
                                group: Mapping[str, Any]) -> tuple[int, ...] | None:
    """optax.adafactor's state: a factored tensor keeps ``v_row`` (its shape without the
    largest dim d0) and ``v_col`` (without d1), another ``v``, its own shape; ``ema``
    (momentum not None) is the tensor's own shape."""
    if slot == "ema":
        return shape
    dims = optax_factored_dims(shape, group)
    if dims is None:
        return shape if slot == "v" else None
    drop = {"v_row": dims[1], "v_col": dims[0]}.get(slot)
    return None if drop is None else shape[:drop] + shape[drop + 1:]


OPTAX_ADAFACTOR = _optax("adafactor", {
    "learning_rate": None, "min_dim_size_to_factor": 128, "decay_rate": 0.8,
    "decay_offset": 0, "multiply_by_parameter_scale": True, "clipping_threshold": 1.0,
    "momentum": None, "dtype_momentum": "float32", "weight_decay_rate": None, "eps": 1e-30,
    "factored": True,
}, required=frozenset(),  # learning_rate None: no scaling
    nullable=frozenset({"learning_rate", "clipping_threshold", "momentum", "weight_decay_rate"}),
    integers=frozenset({"min_dim_size_to_factor", "decay_offset"}),
    slot_shapes=_optax_adafactor_slot_shape)

OPTAX_ROWS = (
    OPTAX_ADAM, OPTAX_ADAMW, _optax_alias(OPTAX_ADAM, "nadam", nesterov=True),
    _optax_alias(OPTAX_ADAMW, "nadamw", nesterov=True), OPTAX_RADAM, OPTAX_AMSGRAD,
    OPTAX_ADAMAX, OPTAX_LAMB, OPTAX_ADAFACTOR,
)

ALGORITHMS: Mapping[str, AlgorithmDef] = MappingProxyType({a.name: a for a in (
    ADAM, ADAM.alias("amsgrad", amsgrad=True), ADAMW, NADAM, RADAM, ADAMAX, ADAGRAD,
    RMSPROP, LAMB, ADAMW_SCHEDULE_FREE, RADAM_SCHEDULE_FREE, ADAFACTOR, MUON, SPARSE_ADAM,
    *OPTAX_ROWS,
)})
# The keys any row holds as whole numbers (a group exported or described writes them as ints).
INTEGER_KEYS = frozenset().union(*(a.integers for a in ALGORITHMS.values()))
# Numbers that may be None in some row (on the wire: in Group.unset; the engine keeps None
# as NaN): torch.optim.Adafactor's eps1, optax.adafactor's learning_rate, ...
NULLABLE = frozenset().union(*(a.nullable for a in ALGORITHMS.values()))

# Whose definition of the update rules a session follows (SessionSpec.semantics): torch's
# rows above, or optax's, keyed "optax.<alias>".
SEMANTICS = ("torch", "optax")


def qualified(name: str, semantics: str = "torch") -> str:
    """The table's key of algorithm ``name`` under ``semantics`` ("adam", "optax" ->
    "optax.adam"; torch's keys are the names themselves, returned unchanged); a name
    already qualified is kept. ValueError naming the choices for an unknown semantics."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics: expected one of {', '.join(SEMANTICS)}, got "
                         f"{semantics!r}")
    if semantics == "torch":
        return name
    key = name.strip().lower()
    return key if key.startswith(f"{semantics}.") else f"{semantics}.{key}"
