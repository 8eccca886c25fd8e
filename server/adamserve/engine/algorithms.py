"""The Adam family as data: hyperparameters, state slots, per-step coefficients.

Every algorithm is described by an :class:`AlgorithmSpec`: its torch-compatible
defaults (derived from the table both sides share, :mod:`adamserve_proto.algorithms`),
which flat state buffers ("slots") it keeps, and how one step's scalar coefficients
are derived from the hyperparameters and the integer step count.
The kernels (CPU and GPU) then run a single fused elementwise pass per step that
reads those coefficients per tensor ("segment").

The scalar maths is done here, once per step and per segment, in float64 and in
the same order torch.optim does it, so that the elementwise kernels reproduce
torch to the last bits: torch computes ``lr / (1 - beta1**step)`` on the host as a
Python float and only then rounds it to the tensor's dtype; so do we.

Update rules (g: gradient after clipping, ``maximize`` sign and L2 weight decay;
t: the tensor's step count starting at 1):

* adam / adamw:   m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g²; [vmax = max(vmax, v)]
                  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
                  ``bias_correction=False`` drops both ``1-b^t`` terms.
* nadam:          mu_t = b1 (1 - ½·0.96^(t·ψ)); mu_product *= mu_t
                  p -= lr(1-mu_t)/(1-Πmu) g/d + lr mu_{t+1}/(1-Πmu·mu_{t+1}) m/d,
                  d = sqrt(v/(1-b2^t)) + eps
* radam:          rho_t = rho_inf - 2 t b2^t/(1-b2^t); if rho_t > 5 the rectified
                  adaptive step, else an un-adapted momentum step.
* adamax:         u = max(b2 u, |g| + eps); p -= lr/(1-b1^t) m / u
* adagrad:        s += g²; p -= lr/(1+(t-1)·lr_decay) g / (sqrt(s)+eps)
* rmsprop:        a = α a + (1-α) g²; [centered: ḡ = lerp(ḡ, g, 1-α), a' = a - ḡ²]
                  d = sqrt(a')+eps; momentum: b = μ b + g/d, p -= lr b; else p -= lr g/d
* lamb:           optax.lamb: r = m̂/(sqrt(v̂)+eps) + wd·p;
                  p -= lr · φ · r, φ = ||p||/||r|| per tensor (1 if either norm is 0)
* adamw_schedule_free / radam_schedule_free (facebookresearch's schedulefree 1.4.1):
                  p holds y; per group and step (k: the group's steps before):
                  lr' = lr·min(1, (k+1)/warmup_steps) (AdamW) or lr·rect (RAdam, 0 or 1
                  before rho_t > 4, silent_sgd_phase), lr_max = max(lr', lr_max),
                  w = (k+1)^r · lr_max^weight_lr_power, c = w / Σw;
                  v = b2 v + (1-b2) g²; u = g/(sqrt(v/(1-b2^(k+1)))+eps) [RAdam: only
                  when rho_t > 4] + wd·y; y = lerp(y, z, c) + lr'(b1(1-c)-1) u; z -= lr' u.
                  z starts as the tensor's y. train()/eval() swap p between y and
                  x = lerp(y, z, 1-1/b1) (:func:`swap_weight`); k, train_mode,
                  weight_sum, lr_max and scheduled_lr are the group's state.
* adafactor:      torch.optim.Adafactor: w = t^beta2_decay, rho = min(lr, 1/sqrt(t)),
                  alpha = max(eps2, RMS(p)) rho (p before the decay p *= 1 - lr wd);
                  ndim >= 2 (over the last two dims): R = lerp(R, mean_cols(g²), w),
                  C = lerp(C, mean_rows(g²), w), v = R C / max(mean(R), eps1); else
                  v = lerp(v, g², w); U = g / sqrt(max(v, eps1²));
                  p -= alpha / max(1, RMS(U)/d) · U. eps1 None: the dtype's epsilon
                  (:mod:`adamserve.engine.adafactor`).
* muon:           torch.optim.Muon, 2-D tensors only: b = lerp(b, g, 1-mu);
                  u = lerp(g, b, mu) (nesterov) or b; O = NS_{a,b,c}^{ns_steps}(u) (the
                  Newton-Schulz iteration, in the state dtype: torch's runs in bfloat16);
                  p = p (1 - lr wd) - lr adj(shape) O (:mod:`adamserve.engine.muon`).
* sparse_adam:    torch.optim.SparseAdam, lazily: only the rows (along dim 0) a
                  sparse gradient touches change; on them m += (g - m)(1-b1),
                  v += (g² - v)(1-b2), p -= lr sqrt(1-b2^t)/(1-b1^t) · m/(sqrt(v)+eps);
                  t counts every step the tensor took part in, rows or none
                  (:mod:`adamserve.engine.sparse_adam`).

optax 0.2 (semantics "optax", the table's ``optax.<alias>`` rows: optax's names, its
defaults and its order of operations; t = the tensor's count after the step, c = t - 1):

* optax.adam / adamw / nadam / nadamw (nesterov) / amsgrad / radam (one kernel):
                  m = (1-b1) g + b1 m; v = (1-b2) g² + b2 v; m stored in mu_dtype;
                  m̂ = m/(1-b1^t), or b1 m/(1-b1^(t+1)) + (1-b1) g/(1-b1^t) (nesterov);
                  v̂ = v/(1-b2^t); u = m̂ / (sqrt(v̂ + eps_root) + eps)
                  amsgrad: v̂max = max(v̂max, v̂) in place of v̂ (each correction off with
                  bias_correction_mu / bias_correction_nu);
                  radam: ro = ro_inf - 2 t b2^t/(1-b2^t), u = r m̂/(sqrt(v̂ + eps_root) + eps)
                  where ro >= threshold, else u = m̂; adamw: u += wd p; p += (-lr) u.
* optax.adamax:   m as adam; v = max(|g| + eps, b2 v); p += (-lr) (m/(1-b1^t)) / v.
* optax.lamb:     u = adam's (no nesterov) + wd p; p += (-lr) (u · φ), φ = ||p||/||u||
                  per tensor (1 where either is 0): two passes, u computed in both
                  (:mod:`adamserve.engine.optax_lamb`).
* optax.adafactor: d = 1 - (c - decay_offset + 1)^-decay_rate (float32, as optax);
                  G = g² + eps; factored (the two largest dims, the second >= 128):
                  v_row = d v_row + (1-d) mean_{d0}(G), v_col = d v_col + (1-d) mean_{d1}(G),
                  U = g (v_row/mean_{d1}(v_row))^-½ v_col^-½; else v = d v + (1-d) G,
                  U = g v^-½; U /= max(1, RMS(U)/clipping_threshold); U *= lr;
                  U *= max(RMS(p), 1e-3) (multiply_by_parameter_scale);
                  [e = (1-momentum) U + momentum e, U = e]; U += weight_decay_rate p;
                  p -= U (:mod:`adamserve.engine.optax_adafactor`).

The optax rows' host scalars are computed in the session's dtype, as optax computes them
(XLA's float32 arithmetic in a float32 session, ``pow`` the C library's:
:mod:`adamserve.engine.libm`), where torch's are Python floats; their learning rate
is ``learning_rate`` (:attr:`AlgorithmSpec.lr_key`), which a server schedule scales.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine import libm
from adamserve.errors import FailedPrecondition, shown
from adamserve_proto import algorithms as table

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

HyperValue = float | bool
Hyperparameters = dict[str, HyperValue]


class Algorithm(StrEnum):
    ADAM = "adam"
    ADAMW = "adamw"
    NADAM = "nadam"
    RADAM = "radam"
    ADAMAX = "adamax"
    ADAGRAD = "adagrad"
    RMSPROP = "rmsprop"
    LAMB = "lamb"
    ADAMW_SCHEDULE_FREE = "adamw_schedule_free"
    RADAM_SCHEDULE_FREE = "radam_schedule_free"
    ADAFACTOR = "adafactor"
    MUON = "muon"
    SPARSE_ADAM = "sparse_adam"
    # optax 0.2's aliases (optax.nadam and optax.nadamw: optax.adam and optax.adamw with
    # nesterov=True)
    OPTAX_ADAM = "optax.adam"
    OPTAX_ADAMW = "optax.adamw"
    OPTAX_AMSGRAD = "optax.amsgrad"
    OPTAX_RADAM = "optax.radam"
    OPTAX_ADAMAX = "optax.adamax"
    OPTAX_LAMB = "optax.lamb"
    OPTAX_ADAFACTOR = "optax.adafactor"


# The schedule-free pair: one kernel, per-group state, the train()/eval() swap.
SCHEDULE_FREE = frozenset({Algorithm.ADAMW_SCHEDULE_FREE, Algorithm.RADAM_SCHEDULE_FREE})
# optax's Adam variants: one fused kernel (kernels_cpu.optax_adam), told apart by columns.
OPTAX_ADAM_FAMILY = frozenset({Algorithm.OPTAX_ADAM, Algorithm.OPTAX_ADAMW,
                               Algorithm.OPTAX_AMSGRAD, Algorithm.OPTAX_RADAM})
OPTAX = OPTAX_ADAM_FAMILY | {Algorithm.OPTAX_ADAMAX, Algorithm.OPTAX_LAMB,
                             Algorithm.OPTAX_ADAFACTOR}


class HyperparameterError(ValueError):
    """A hyperparameter is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """What one algorithm keeps and accepts.

    ``defaults`` are the shared table's (:mod:`adamserve_proto.algorithms`: torch.optim's,
    LAMB optax.lamb's, with the server's extras), numbers as floats and ``betas``
    flattened to ``beta1``/``beta2``, so every value is a plain float or bool.
    ``bools``: the keys whose values are true/false. ``state``: the per-group state
    (the table's ``group_state``) with its initial values, kept in each group beside
    the hyperparameters; ``integers``: keys whose values are whole numbers; ``nullable``:
    the numbers that may be None (kept as NaN). ``lr_key``: the learning rate's key,
    which a server schedule scales (torch's ``lr``, optax's ``learning_rate``), and
    ``beta1_key`` the first moment's decay a one-cycle schedule cycles.
    """

    algorithm: Algorithm
    defaults: Mapping[str, HyperValue]
    bools: frozenset[str] = field(default_factory=frozenset)
    state: Mapping[str, HyperValue] = field(default_factory=dict)
    integers: frozenset[str] = field(default_factory=frozenset)
    nullable: frozenset[str] = field(default_factory=frozenset)
    lr_key: str = "lr"
    beta1_key: str = "beta1"

    @property
    def keys(self) -> frozenset[str]:
        """Every key a group holds: the hyperparameters and the per-group state."""
        return frozenset(self.defaults) | frozenset(self.state)

    def slots(self, h: Mapping[str, HyperValue]) -> tuple[str, ...]:
        """The per-element state buffers for one group, in torch's state_dict names (optax's
        rows: the names of optax's states, ``mu``, ``nu``, ``nu_max``, Adafactor's
        ``v_row``, ``v_col``, ``v`` and its momentum's ``ema``)."""
        a = self.algorithm
        if a in OPTAX:
            if a is Algorithm.OPTAX_ADAFACTOR:  # a tensor keeps the first two or the third
                base = ("v_row", "v_col", "v")
                return (*base, "ema") if not math.isnan(float(h["momentum"])) else base
            return ("mu", "nu", "nu_max") if a is Algorithm.OPTAX_AMSGRAD else ("mu", "nu")
        if a in SCHEDULE_FREE:
            return ("z", "exp_avg_sq")
        if a is Algorithm.MUON:
            return ("momentum_buffer",)
        if a is Algorithm.ADAFACTOR:  # each tensor keeps the first two or the third
            return ("row_var", "col_var", "variance")
        if a in (Algorithm.ADAM, Algorithm.ADAMW):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if h["amsgrad"] else (
                "exp_avg", "exp_avg_sq")
        if a in (Algorithm.NADAM, Algorithm.RADAM, Algorithm.LAMB, Algorithm.SPARSE_ADAM):
            return ("exp_avg", "exp_avg_sq")
        if a is Algorithm.ADAMAX:
            return ("exp_avg", "exp_inf")
        if a is Algorithm.ADAGRAD:
            return ("sum",)
        slots: list[str] = ["square_avg"]
        if float(h["momentum"]) > 0:
            slots.append("momentum_buffer")
        if h["centered"]:
            slots.append("grad_avg")
        return tuple(slots)


def _choice(key: str, value: Any) -> float:
    """A choice (a name of the table's CHOICES, or None) as the engine keeps it: its index
    there, a number like every other value (an index is taken too: checkpoints hold it)."""
    choices = table.CHOICES[key]
    if value is None or isinstance(value, str):
        if value in choices:
            return float(choices.index(value))
    elif (isinstance(value, int | float | np.integer | np.floating)
          and float(value) in range(len(choices))):
        return float(value)
    names = ", ".join("None" if c is None else repr(c) for c in choices)
    if isinstance(value, str) and value in _REFUSED_DTYPES and choices is table.OPTAX_DTYPES:
        raise HyperparameterError(f"{key} {value!r}: {_REFUSED_DTYPES[value]}; expected one "
                                  f"of {names} (None: the session's dtype)")
    raise HyperparameterError(f"{key}: expected one of {names}, got {shown(value)}")


def choice_names(h: Mapping[str, Any]) -> dict[str, Any]:
    """``h`` with each choice (kept as its index) under its name, as torch keeps it."""
    return {k: table.CHOICES[k][int(v)] if k in table.CHOICES and not isinstance(v, str | None)
            else v for k, v in h.items()}


def with_none(h: Mapping[str, Any]) -> dict[str, Any]:
    """``h`` with each key of the table's NULLABLE that holds NaN (Adafactor's eps1) as
    torch's None."""
    return {k: None if k in table.NULLABLE and isinstance(v, float) and math.isnan(v) else v
            for k, v in h.items()}


def _kept(key: str, value: Any, nullable: frozenset[str]) -> HyperValue:
    """A default as the engine keeps it, a number or true/false: a choice as its index,
    None (of a nullable key) as NaN."""
    if key in table.CHOICES:
        return _choice(key, value)
    return math.nan if value is None and key in nullable else value


def _spec(row: table.AlgorithmDef) -> AlgorithmSpec:
    nullable = row.nullable | {m for k in row.nullable for m in table.TUPLES.get(k, ())}
    defaults: Hyperparameters = {  # None (Adafactor's eps1) kept as NaN: every value a number
        k: _kept(k, v, nullable) for k, v in table.split_betas(row.wire_defaults()).items()}
    state: Hyperparameters = {k: v if isinstance(v, bool) else float(v)
                              for k, v in row.group_state.items()}
    bools = frozenset(k for k, v in {**defaults, **state}.items() if isinstance(v, bool))
    optax = row.name.startswith("optax.")
    return AlgorithmSpec(Algorithm(row.runs), defaults, bools, state, row.integers, nullable,
                         "learning_rate" if optax else "lr", "b1" if optax else "beta1")


SPECS: dict[Algorithm, AlgorithmSpec] = {
    Algorithm(row.name): _spec(row) for row in table.ALGORITHMS.values() if row.name == row.runs
}
if set(SPECS) != set(Algorithm):  # pragma: no cover - the table and the kernels disagree
    raise ImportError(f"adamserve_proto.algorithms describes {sorted(SPECS)}; the engine "
                      f"runs {sorted(Algorithm)}")

# Names accepted on the wire that are one algorithm with an option set.
ALIASES: dict[str, tuple[Algorithm, Hyperparameters]] = {
    row.name: (Algorithm(row.runs), dict(row.options))
    for row in table.ALGORITHMS.values() if row.name != row.runs
}

# Hyperparameters that must lie in [0, 1); every other number in [0, MAX_VALUE].
_UNIT_INTERVAL = ("beta1", "beta2", "alpha", "b1", "b2")

# The largest hyperparameter (lr, eps, weight_decay, momentum, ...), max_grad_norm and
# schedule factor a session takes: far past any training's, and small enough that no
# coefficient a step computes from them (lr · factor / div_factor / final_div_factor,
# lr / (1 - beta1^t), 1 - lr · weight_decay) leaves float32's range, so nothing a
# client sets can overflow into an Inf that no answer could carry.
MAX_VALUE = 1e6

# The per-group state of the schedule-free pair: the group's step count (exact in a
# float64), the running sum of averaging weights (unbounded: it grows with the steps),
# the largest lr used (-1 before the first step) and the last one, for logging.
MAX_GROUP_STEPS = 2**53
_STATE_RANGE: dict[str, tuple[float, float]] = {
    "k": (0.0, float(MAX_GROUP_STEPS)), "weight_sum": (0.0, math.inf),
    "lr_max": (-1.0, math.inf), "scheduled_lr": (0.0, math.inf),
}
# Adafactor's bounds, torch's: beta2_decay <= 0, d >= 1.
_RANGE: dict[str, tuple[float, float]] = {
    "beta2_decay": (-MAX_VALUE, 0.0), "d": (1.0, MAX_VALUE),
}
# Muon's: Newton-Schulz coefficients of either sign (torch's b is -4.775), and fewer than
# 100 steps (torch raises at step time for more).
_RANGE.update({"ns_a": (-MAX_VALUE, MAX_VALUE), "ns_b": (-MAX_VALUE, MAX_VALUE),
               "ns_c": (-MAX_VALUE, MAX_VALUE), "ns_steps": (0.0, 99.0)})
# Keys that must be > 0, not only >= 0, where the algorithm's class refuses 0 (torch's
# SparseAdam: "Invalid learning rate", "Invalid epsilon value"), or its maths divides by
# the value (optax.adafactor's clipping threshold).
_POSITIVE: dict[Algorithm, frozenset[str]] = {
    Algorithm.SPARSE_ADAM: frozenset({"lr", "eps"}),
    Algorithm.OPTAX_ADAFACTOR: frozenset({"clipping_threshold"})}
# Ranges of one algorithm's keys, where a name means something else elsewhere:
# optax.adafactor's momentum is an EMA's decay in [0, 1]; optax.radam's rectification
# sqrt((ro-4)(ro-2)...) is real only for ro >= 4, so a threshold below 4 is refused (the
# update would be NaN where optax applies it).
_ALGORITHM_RANGE: dict[Algorithm, dict[str, tuple[float, float]]] = {
    Algorithm.OPTAX_ADAFACTOR: {"momentum": (0.0, 1.0)},
    Algorithm.OPTAX_RADAM: {"threshold": (4.0, MAX_VALUE)},
}
# Values an algorithm takes only at their defaults: optax.adafactor's factoring rule
# sizes the state when the session is created (the table's slot shapes).
_FIXED: dict[Algorithm, frozenset[str]] = {
    Algorithm.OPTAX_ADAFACTOR: frozenset({"min_dim_size_to_factor", "factored"})}
# optax's dtypes kept elsewhere: bfloat16 moments are the session's state_dtype.
_REFUSED_DTYPES = {"bfloat16": "bfloat16 moments are the session's state_dtype=\"bfloat16\", "
                               "not an accumulator dtype"}


def _shown_value(v: HyperValue) -> str:
    """A kept value as a message shows it: true/false, a number in its shortest form."""
    return str(v).lower() if isinstance(v, bool) else f"{v:g}"


def parse_algorithm(name: str) -> tuple[Algorithm, Hyperparameters]:
    """Resolve a wire name (case-insensitive, aliases allowed) to an algorithm."""
    key = name.strip().lower()
    if key in ALIASES:
        algo, extra = ALIASES[key]
        return algo, dict(extra)
    try:
        return Algorithm(key), {}
    except ValueError:
        known = sorted([a.value for a in Algorithm] + list(ALIASES))
        raise HyperparameterError(
            f"unknown algorithm {shown(name)}; expected one of {', '.join(known)}"
        ) from None


def resolve_hyperparameters(
    algorithm: Algorithm, given: Mapping[str, Any], base: Mapping[str, HyperValue] | None = None
) -> Hyperparameters:
    """Validate ``given`` over ``base`` (default: the algorithm's defaults and initial
    per-group state).

    Accepts torch's tuples (``betas=(b1, b2)``, Adafactor's ``eps=(eps1, eps2)``) as well
    as their members (``beta1``/``beta2``). Numbers are finite (a key of the table's
    NULLABLE may be None, kept as NaN): ``beta1``, ``beta2``, ``alpha`` in [0, 1), the
    per-group state in its range (:data:`_STATE_RANGE`), Adafactor's ``beta2_decay`` <= 0
    and ``d`` >= 1, the others in [0, MAX_VALUE]; the table's integer
    keys whole. Raises :class:`HyperparameterError` naming the offending key and what
    was expected.
    """
    spec = SPECS[algorithm]
    out: Hyperparameters = dict(base if base is not None else {**spec.defaults, **spec.state})
    items = dict(given)
    for name, members in table.TUPLES.items():  # torch's tuples: betas, Adafactor's eps...
        if name not in items or (name in spec.keys and not isinstance(items[name], list | tuple)):
            continue  # eps is a number but for Adafactor
        value = items.pop(name)
        if not isinstance(value, list | tuple) or len(value) != len(members):
            raise HyperparameterError(f"{name}: expected {len(members)} values "
                                      f"({', '.join(members)}), got {shown(value)}")
        for member, v in zip(members, value, strict=True):
            items.setdefault(member, v)
    for key, value in items.items():
        if key not in spec.keys:
            raise HyperparameterError(
                f"unknown hyperparameter {shown(key)} for {algorithm.value}; expected one of "
                f"{', '.join(sorted(spec.defaults))}"
            )
        if key in table.CHOICES:  # Muon's adjust_lr_fn: kept as the choice's index
            out[key] = _choice(key, value)
            continue
        if key in spec.nullable and (value is None or (
                isinstance(value, float) and math.isnan(value))):
            out[key] = math.nan  # None (torch's Adafactor's eps1: the dtype's epsilon)
            continue
        if key in spec.bools:
            if not isinstance(value, bool | np.bool_):
                raise HyperparameterError(f"{key}: expected true or false, got {shown(value)}")
            out[key] = bool(value)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
            raise HyperparameterError(f"{key}: expected a number, got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise HyperparameterError(f"{key}: expected a finite number, got {shown(value)}")
        whole = key in spec.integers
        if whole and not number.is_integer():
            raise HyperparameterError(f"{key}: expected a whole number, got {number!r}")
        lo, hi = (0.0, 1.0) if key in _UNIT_INTERVAL else _ALGORITHM_RANGE.get(
            algorithm, {}).get(key) or _STATE_RANGE.get(key, _RANGE.get(key, (0.0, MAX_VALUE)))
        if key in _UNIT_INTERVAL and not lo <= number < hi:
            raise HyperparameterError(f"{key}: expected a value in [0, 1), got {number!r}")
        if number < lo and lo == 0.0:
            raise HyperparameterError(f"{key}: expected a {'whole number' if whole else 'value'} "
                                      f">= 0, got {number!r}")
        if number == 0.0 and key in _POSITIVE.get(algorithm, ()):
            raise HyperparameterError(f"{key}: expected a value > 0 for {algorithm.value}, got "
                                      f"{number!r}")
        if not lo <= number <= hi:
            raise HyperparameterError(
                f"{key}: expected a {'whole number' if whole else 'value'} in "
                f"[{lo:g}, {hi:g}], got {number!r}")
        out[key] = number
    fixed = _FIXED.get(algorithm, frozenset())
    for key in sorted(fixed):
        if out[key] != spec.defaults[key]:
            defaults = ", ".join(f"{k}={_shown_value(spec.defaults[k])}" for k in sorted(fixed))
            raise HyperparameterError(
                f"{key}: {algorithm.value}'s state is laid out by optax's default factoring "
                f"({defaults}) when the session is created; other values are not supported, "
                f"got {_shown_value(out[key])}")
    return out


def state_changes(algorithm: Algorithm, changes: Mapping[str, Any]) -> None:
    """Refuse a change (SetHyperparameters) of the per-group state the steps keep, which
    only a state_dict (ImportState) sets; ``train_mode`` is the one that may change."""
    fixed = sorted(set(changes) & set(SPECS[algorithm].state) - {"train_mode"})
    if fixed:
        raise HyperparameterError(
            f"{', '.join(fixed)}: the per-group state of {algorithm.value}, kept by its steps, "
            "not a hyperparameter (load a state_dict to set it); of that state only "
            "train_mode may change (the client's train() and eval())")


# ---------------------------------------------------------------------------
# Per-step coefficients. Each function returns a float64 matrix [segments, K]
# whose columns the matching kernel reads; columns 0-2 are shared by all:
#   0 gscale  gradient multiplier (clipping coefficient, negated for maximize)
#   1 wd_l2   L2 weight decay added to the gradient
#   2 decay   decoupled weight decay multiplier on the parameter (1 - lr·wd)
# ---------------------------------------------------------------------------

COMMON_COLUMNS = 3


@dataclass
class SegmentHyper:
    """Hyperparameters spread to one value per segment, plus the segment's step."""

    values: dict[str, F64]
    step: I64  # the step count each segment is about to take (>= 1)
    mu_product: F64  # NAdam's running product; ones elsewhere
    # the schedule-free pair: every group's state after this step (None elsewhere)
    group_state: Sequence[Hyperparameters] | None = None
    # the session's dtype, in which optax's rows compute their scalars
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.float64))

    def __getitem__(self, key: str) -> F64:
        return self.values[key]


def _common(h: SegmentHyper, lr: F64, gscale: F64, decoupled: F64) -> F64:
    wd = h["weight_decay"]
    sign = np.where(h["maximize"] > 0, -1.0, 1.0)
    wd_l2 = np.where(decoupled > 0, 0.0, wd)
    decay = np.where((decoupled > 0) & (wd != 0), 1.0 - lr * wd, 1.0)
    return np.stack([gscale * sign, wd_l2, decay], axis=1)


def _cols(*columns: F64) -> F64:
    return np.stack(columns, axis=1)


def _bias_corrections(h: SegmentHyper) -> tuple[F64, F64]:
    """1 - beta1^t and 1 - beta2^t, or ones where ``bias_correction`` is off."""
    t = h.step.astype(np.float64)
    bc = h["bias_correction"] > 0
    return np.where(bc, 1.0 - h["beta1"] ** t, 1.0), np.where(bc, 1.0 - h["beta2"] ** t, 1.0)


def _adam(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    b1, b2 = h["beta1"], h["beta2"]
    bc1, bc2 = _bias_corrections(h)
    step_size = lr / bc1
    return np.hstack([
        _common(h, lr, gscale, h["decoupled_weight_decay"]),
        _cols(1.0 - b1, b2, 1.0 - b2, step_size, bc2**0.5, h["eps"], h["amsgrad"]),
    ])


def _nadam(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    t = h.step.astype(np.float64)
    b1, b2, psi = h["beta1"], h["beta2"], h["momentum_decay"]
    bc2 = 1.0 - b2**t
    mu = b1 * (1.0 - 0.5 * (0.96 ** (t * psi)))
    mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * psi)))
    mu_product = h.mu_product * mu
    mu_product_next = mu_product * mu_next
    c_grad = -lr * (1.0 - mu) / (1.0 - mu_product)
    c_avg = (-lr * mu_next) / (1.0 - mu_product_next)
    return np.hstack([
        _common(h, lr, gscale, h["decoupled_weight_decay"]),
        _cols(1.0 - b1, b2, 1.0 - b2, bc2, h["eps"], c_grad, c_avg),
    ])


def _radam(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    t = h.step.astype(np.float64)
    b1, b2 = h["beta1"], h["beta2"]
    bc1 = 1.0 - b1**t
    bc2 = 1.0 - b2**t
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    rho_t = rho_inf - 2.0 * t * (b2**t) / bc2
    rectify = rho_t > 5.0
    safe_rho = np.where(rectify, rho_t, 5.0)
    rect = np.where(
        rectify,
        ((safe_rho - 4) * (safe_rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe_rho))
        ** 0.5,
        1.0,
    )
    return np.hstack([
        _common(h, lr, gscale, h["decoupled_weight_decay"]),
        _cols(1.0 - b1, b2, 1.0 - b2, bc1, lr, rectify.astype(np.float64), rect, bc2**0.5,
              h["eps"]),
    ])


def _adamax(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    t = h.step.astype(np.float64)
    b1 = h["beta1"]
    clr = lr / (1.0 - b1**t)
    return np.hstack([
        _common(h, lr, gscale, np.zeros_like(lr)),
        _cols(1.0 - b1, h["beta2"], h["eps"], clr),
    ])


def _adagrad(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    t = h.step.astype(np.float64)
    clr = lr / (1 + (t - 1) * h["lr_decay"])
    return np.hstack([_common(h, lr, gscale, np.zeros_like(lr)), _cols(clr, h["eps"])])


def _rmsprop(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    alpha = h["alpha"]
    return np.hstack([
        _common(h, lr, gscale, np.zeros_like(lr)),
        _cols(alpha, 1.0 - alpha, h["centered"], h["eps"], h["momentum"], lr),
    ])


def _lamb(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    b1, b2 = h["beta1"], h["beta2"]
    bc1, bc2 = _bias_corrections(h)
    common = _common(h, lr, gscale, np.zeros_like(lr))
    common[:, 1] = 0.0  # LAMB's weight decay is added to the update, not the gradient
    return np.hstack([
        common,
        _cols(b1, 1.0 - b1, b2, 1.0 - b2, bc1, bc2, h["eps"], h["weight_decay"], lr),
    ])


def _adafactor(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    """torch's per-tensor scalars in its order and as Python floats (``t ** 0.5`` a pow,
    as torch's ``step ** 0.5``); the kernels read w and eps1, the host the rest."""
    t = [float(s) for s in h.step]
    w = [s ** b for s, b in zip(t, h["beta2_decay"].tolist(), strict=True)]
    rho = [min(r, 1 / (s ** 0.5)) for s, r in zip(t, lr.tolist(), strict=True)]
    eps1 = h["eps1"]
    return np.hstack([
        _common(h, lr, gscale, np.ones_like(lr)),
        _cols(np.array(w), eps1, eps1 * eps1, np.array(rho), h["eps2"], h["d"]),
    ])


ADAFACTOR_COLUMNS = ("w", "eps1", "eps1_sq", "rho", "eps2", "d")  # after the common three


def _muon(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    """The momentum kernel's 1 - mu, mu and nesterov, and the unadjusted lr (the apply's
    scale lr·adj(shape) comes from :func:`adamserve.engine.muon.adjusted_lr`); the decay
    1 - lr·wd uses the unadjusted lr, as torch's does. Muon has no maximize."""
    mu = h["momentum"]
    n = len(lr)
    return np.hstack([_cols(gscale, np.zeros(n), 1.0 - lr * h["weight_decay"]),
                      _cols(1.0 - mu, mu, h["nesterov"], lr)])


MUON_LR_COLUMN = COMMON_COLUMNS + 3


def _sparse_adam(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    """torch's ``_functional.sparse_adam`` scalars: 1 - b1, 1 - b2, eps and -step_size,
    step_size = lr * sqrt(1 - b2**t) / (1 - b1**t) in Python floats and torch's order.
    SparseAdam has no weight decay."""
    step_size = [r * math.sqrt(1 - b2**t) / (1 - b1**t) for r, b1, b2, t in zip(
        lr.tolist(), h["beta1"].tolist(), h["beta2"].tolist(), h.step.tolist(), strict=True)]
    n = len(lr)
    sign = np.where(h["maximize"] > 0, -1.0, 1.0)
    return np.hstack([_cols(gscale * sign, np.zeros(n), np.ones(n)),
                      _cols(1.0 - h["beta1"], 1.0 - h["beta2"], h["eps"],
                            -np.array(step_size, dtype=np.float64))])


# -- optax's rows ------------------------------------------------------------------------
# Each scalar as optax forms it: a hyperparameter (a Python float there: b1, 1 - b1, eps)
# rounded to the session's dtype once (JAX's weak types); what optax computes from arrays
# (1 - b1**count, RAdam's ro, Adafactor's decay) computed in that dtype, with the C
# library's pow (adamserve.engine.libm). Every column holds a value of the session's
# dtype, so the host's float64 matrix and the kernels' agree.

_DTYPE_INDEX = {name: float(i) for i, name in enumerate(table.OPTAX_DTYPES)}
OPTAX_KIND = {Algorithm.OPTAX_ADAM: 0.0, Algorithm.OPTAX_ADAMW: 0.0,
              Algorithm.OPTAX_AMSGRAD: 1.0, Algorithm.OPTAX_RADAM: 2.0}


def check_accumulator_dtypes(algorithm: Algorithm, groups: Sequence[Mapping[str, Any]],
                             dtype: np.dtype[Any] | str) -> None:
    """Refuse an optax accumulator dtype (``mu_dtype``, Adafactor's ``dtype_momentum``)
    wider than the session's: a float32 session cannot keep a float64 moment. float32 in
    a float64 session is kept rounded to float32 (optax's cast); None is the session's.
    Adafactor's dtype_momentum counts only with a momentum (optax keeps no EMA without)."""
    if np.dtype(dtype) != np.float32:
        return
    for g, h in enumerate(groups):
        used = ("mu_dtype", *(("dtype_momentum",) if not math.isnan(float(
            h.get("momentum", math.nan))) else ()))
        for key in used:
            if key in h and float(h[key]) == _DTYPE_INDEX["float64"]:
                raise HyperparameterError(
                    f"{key} 'float64' (group {g}): a float32 session keeps {algorithm.value}'s "
                    "accumulators in float32; expected None or 'float32', or a float64 session")


def _float32_accumulator(h: SegmentHyper, key: str, used: npt.NDArray[np.bool_] | None = None
                         ) -> F64:
    """1 where accumulator ``key`` is float32 (stored rounded to it), else 0; a float64
    one in a float32 session refused where it is ``used`` (default: everywhere)."""
    index = np.where(True if used is None else used, h[key], _DTYPE_INDEX[None])
    if h.dtype == np.float32 and (index == _DTYPE_INDEX["float64"]).any():
        raise HyperparameterError(f"{key} 'float64': a float32 session keeps its accumulators "
                                  "in float32; expected None or 'float32', or a float64 session")
    out: F64 = (index == _DTYPE_INDEX["float32"]).astype(np.float64)
    return out


def _one_minus_pow(h: SegmentHyper, decay: F64, t: F64) -> F64:
    """optax's bias correction ``1 - decay**count``, in the session's dtype."""
    out: F64 = (h.dtype.type(1) - libm.power(decay, t, h.dtype)).astype(np.float64)
    return out


def _in_dtype(h: SegmentHyper, columns: Sequence[F64 | float]) -> F64:
    """The columns as a matrix of values of the session's dtype (held as float64)."""
    n = len(h.step)
    rows = np.stack([np.broadcast_to(np.asarray(c, dtype=np.float64), (n,)) for c in columns],
                    axis=1)
    out: F64 = rows.astype(h.dtype).astype(np.float64)
    return out


def _radam_rectification(h: SegmentHyper, t: F64) -> tuple[F64, F64]:
    """optax.scale_by_radam's ``ro >= threshold`` and r, in its order and the session's
    dtype: ro = ro_inf - 2 t b2^t / (1 - b2^t), r = sqrt((ro-4)(ro-2) ro_inf /
    ((ro_inf-4)(ro_inf-2) ro)) (ro_inf, and the product of its two factors, Python
    floats there)."""
    d, b2 = h.dtype, h["b2"]
    f = d.type
    ro_inf = 2.0 / (1.0 - b2) - 1.0
    b2t = libm.power(b2, t, d)
    ro = ro_inf.astype(d) - ((2.0 * t).astype(d) * b2t) / (f(1) - b2t)
    rectify = ro >= h["threshold"].astype(d)
    with np.errstate(divide="ignore", invalid="ignore"):  # only where ro >= threshold >= 4
        r = np.sqrt((ro - f(4)) * (ro - f(2)) * ro_inf.astype(d)
                    / (((ro_inf - 4.0) * (ro_inf - 2.0)).astype(d) * ro))
    return rectify.astype(np.float64), np.where(rectify, r, 0.0).astype(np.float64)


def _optax_adam(h: SegmentHyper, lr: F64, gscale: F64, kind: float = 0.0) -> F64:
    """optax.adam, adamw (nadam, nadamw: nesterov), amsgrad (kind 1), radam (kind 2)."""
    n = len(lr)
    zeros, ones = np.zeros(n), np.ones(n)
    t = h.step.astype(np.float64)
    b1, b2 = h["b1"], h["b2"]
    values = h.values
    nesterov = values.get("nesterov", zeros)
    bc1, bc2 = _one_minus_pow(h, b1, t), _one_minus_pow(h, b2, t)
    bc1_next = np.where(nesterov > 0, _one_minus_pow(h, b1, t + 1.0), 1.0)
    if kind == OPTAX_KIND[Algorithm.OPTAX_AMSGRAD]:
        bc1 = np.where(values["bias_correction_mu"] > 0, bc1, 1.0)
        bc2 = np.where(values["bias_correction_nu"] > 0, bc2, 1.0)
    rectify, r = zeros, zeros
    if kind == OPTAX_KIND[Algorithm.OPTAX_RADAM]:
        rectify, r = _radam_rectification(h, t)
    round_mu = _float32_accumulator(h, "mu_dtype") if "mu_dtype" in values else zeros
    return _in_dtype(h, [gscale, zeros, ones, b1, 1.0 - b1, b2, 1.0 - b2, bc1, bc1_next, bc2,
                         h["eps"], h["eps_root"], nesterov, kind, rectify, r,
                         values.get("weight_decay", zeros), -lr, round_mu])


def _optax_adamax(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    n = len(lr)
    b1 = h["b1"]
    bc1 = _one_minus_pow(h, b1, h.step.astype(np.float64))
    return _in_dtype(h, [gscale, np.zeros(n), np.ones(n), b1, 1.0 - b1, h["b2"], h["eps"], bc1,
                         -lr])


def _optax_lamb(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    """optax.lamb's columns; the trust ratio's (1 here) is set between the two passes."""
    n = len(lr)
    t = h.step.astype(np.float64)
    b1, b2 = h["b1"], h["b2"]
    return _in_dtype(h, [gscale, np.zeros(n), np.ones(n), b1, 1.0 - b1, b2, 1.0 - b2,
                         _one_minus_pow(h, b1, t), _one_minus_pow(h, b2, t), h["eps"],
                         h["eps_root"], h["weight_decay"], -lr, np.ones(n)])


OPTAX_LAMB_COLUMNS = ("b1", "omb1", "b2", "omb2", "bc1", "bc2", "eps", "eps_root",
                      "weight_decay", "neg_lr", "trust")  # after the common three
OPTAX_LAMB_TRUST = COMMON_COLUMNS + OPTAX_LAMB_COLUMNS.index("trust")


def _optax_adafactor(h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    """optax.adafactor's columns: the decay d = 1 - t^-decay_rate and 1 - d in float32
    (optax's ``_decay_rate_pow``), t = count - decay_offset + 1; None as off (lr 1,
    clipping and momentum off, weight_decay_rate 0); the clipping denominator's and the
    parameter scale's columns (1 here) are set once the norms are known
    (:mod:`adamserve.engine.optax_adafactor`)."""
    n = len(lr)
    count = h.step.astype(np.float64) - 1.0
    offset = h["decay_offset"]
    if (count < offset).any():
        i = int(np.argmax(count < offset))
        raise FailedPrecondition(
            f"decay_offset {offset[i]:g} is past a tensor's step count {count[i]:g}: "
            "optax's decay 1 - (count - decay_offset + 1)^-decay_rate needs count >= "
            "decay_offset (a fine-tuning's offset from its restored count); nothing was "
            "applied")
    f32 = np.dtype(np.float32)
    decay = np.float32(1) - libm.power(count - offset + 1.0, -h["decay_rate"], f32)
    momentum, threshold = h["momentum"], h["clipping_threshold"]
    momentum_on = ~np.isnan(momentum)
    mom = np.where(momentum_on, momentum, 0.0)
    round_ema = _float32_accumulator(h, "dtype_momentum", momentum_on)
    wdr = h["weight_decay_rate"]
    return _in_dtype(h, [
        gscale, np.zeros(n), np.ones(n), decay.astype(np.float64),
        (np.float32(1) - decay).astype(np.float64), h["eps"], np.where(np.isnan(lr), 1.0, lr),
        ~np.isnan(threshold), np.where(np.isnan(threshold), 1.0, threshold),
        h["multiply_by_parameter_scale"], momentum_on, mom, 1.0 - mom, round_ema,
        np.where(np.isnan(wdr), 0.0, wdr), np.ones(n), np.ones(n)])


OPTAX_ADAFACTOR_COLUMNS = (  # after the common three
    "d", "omd", "eps", "lr", "clip", "threshold", "param_scale", "momentum_on", "momentum",
    "omm", "round_ema", "weight_decay_rate", "clip_denominator", "param_rms")


def optax_column(name: str) -> int:
    """The index of optax.adafactor's coefficient column ``name``."""
    return COMMON_COLUMNS + OPTAX_ADAFACTOR_COLUMNS.index(name)


def lr_values(algorithm: Algorithm, values: Mapping[str, F64]) -> F64:
    """The learning rates of the segments ``values`` describe (a server schedule's base):
    the spec's ``lr_key``, None (optax.adafactor's default: no scaling) as 1."""
    lr = values[SPECS[algorithm].lr_key]
    out: F64 = np.where(np.isnan(lr), 1.0, lr)
    return out


def base_lr(algorithm: Algorithm, group: Mapping[str, Any]) -> float:
    """A group's learning rate before a schedule (None as 1, see :func:`lr_values`)."""
    lr = float(group[SPECS[algorithm].lr_key])
    return 1.0 if math.isnan(lr) else lr


COEFFICIENTS: dict[Algorithm, Callable[[SegmentHyper, F64, F64], F64]] = {
    Algorithm.ADAM: _adam,
    Algorithm.ADAMW: _adam,
    Algorithm.NADAM: _nadam,
    Algorithm.RADAM: _radam,
    Algorithm.ADAMAX: _adamax,
    Algorithm.ADAGRAD: _adagrad,
    Algorithm.RMSPROP: _rmsprop,
    Algorithm.LAMB: _lamb,
    Algorithm.ADAFACTOR: _adafactor,
    Algorithm.MUON: _muon,
    Algorithm.SPARSE_ADAM: _sparse_adam,
    **{a: functools.partial(_optax_adam, kind=OPTAX_KIND[a]) for a in OPTAX_ADAM_FAMILY},
    Algorithm.OPTAX_ADAMAX: _optax_adamax,
    Algorithm.OPTAX_LAMB: _optax_lamb,
    Algorithm.OPTAX_ADAFACTOR: _optax_adafactor,
}


# The schedule-free kernel's columns after the common three (gscale, unused, unused),
# then one saying whether the segment takes its first step (z starts as y).
SCHEDULE_FREE_COLUMNS = ("beta2", "omb2", "bc2", "eps", "adapt", "weight_decay", "ckp1", "cy",
                         "lr")


def schedule_free_group(algorithm: Algorithm, h: Mapping[str, HyperValue], lr: float,
                        group: int = 0) -> tuple[dict[str, float], Hyperparameters]:
    """One group's scalars for its next step, and its state after that step.

    In Python floats and in schedulefree's order, so that float64 agrees to the last
    bit; ``lr`` is the group's lr for this step (after a server schedule). Raises
    FailedPrecondition when the averaging weight overflows (the package raises
    OverflowError there).
    """
    k = float(h["k"])
    b2 = float(h["beta2"])
    step = k + 1
    if algorithm is Algorithm.ADAMW_SCHEDULE_FREE:
        warmup = float(h["warmup_steps"])
        lr = lr * ((step / warmup) if k < warmup else 1.0)
        bc2 = 1 - b2**step
        adapt = True
    else:
        beta2_t = b2**step
        bc2 = 1 - beta2_t
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * step * beta2_t / bc2
        adapt = rho_t > 4.0
        rect = (((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                ** 0.5 if adapt else float(not h["silent_sgd_phase"]))
        lr = lr * rect
    lr_max = max(lr, float(h["lr_max"]))
    try:
        weight = (step ** float(h["r"])) * (lr_max ** float(h["weight_lr_power"]))
    except OverflowError:
        weight = math.inf
    weight_sum = float(h["weight_sum"]) + weight
    if not math.isfinite(weight_sum):
        raise FailedPrecondition(
            f"group {group}: the schedule-free averaging weight (k+1)**r * "
            f"lr_max**weight_lr_power = {step:g}**{float(h['r']):g} * "
            f"{lr_max:g}**{float(h['weight_lr_power']):g} overflows at step {step:g}: lower r "
            "or weight_lr_power; nothing was applied")
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0  # schedulefree's ZeroDivisionError
    b1 = float(h["beta1"])
    scalars = {"beta2": b2, "omb2": 1 - b2, "bc2": bc2, "eps": float(h["eps"]),
               "adapt": float(adapt), "weight_decay": float(h["weight_decay"]), "ckp1": ckp1,
               "cy": lr * (b1 * (1 - ckp1) - 1), "lr": lr}
    after: Hyperparameters = {"k": step, "weight_sum": weight_sum, "lr_max": lr_max,
                              "scheduled_lr": lr}
    return scalars, after


def schedule_free_coefficients(scalars: Sequence[Mapping[str, float]], seg_group: I64,
                               gscale: F64, first: npt.NDArray[np.bool_]) -> F64:
    """The kernel's rows for segments of groups ``seg_group`` (one row of ``scalars``
    per group), their gradient scales and whether each takes its first step."""
    table_ = np.array([[row[c] for c in SCHEDULE_FREE_COLUMNS] for row in scalars],
                      dtype=np.float64).reshape(len(scalars), len(SCHEDULE_FREE_COLUMNS))
    n = len(seg_group)
    return np.hstack([_cols(gscale, np.zeros(n), np.ones(n)), table_[seg_group],
                      first.astype(np.float64)[:, None]])


def swap_weight(h: Mapping[str, HyperValue], train: bool, group: int = 0) -> float:
    """The lerp weight toward z that turns a group's parameters from x into y (``train``:
    1 - b1) or from y into x (1 - 1/b1), as schedulefree's train() and eval() do;
    HyperparameterError for eval with beta1 = 0 (x is then not recoverable)."""
    b1 = float(h["beta1"])
    if train:
        return 1 - b1
    if b1 == 0:
        raise HyperparameterError(
            f"train_mode false (eval) for group {group}: with beta1 = 0 the parameters y "
            "equal z and the average x cannot be recovered from them (schedulefree divides "
            "by beta1); set beta1 > 0 first")
    return 1 - 1 / b1


def coefficients(algorithm: Algorithm, h: SegmentHyper, lr: F64, gscale: F64) -> F64:
    """The kernel's coefficient matrix for one step, one row per segment.

    The last column is 1.0: CPU kernels read it to get a one in the state dtype.
    """
    rows = COEFFICIENTS[algorithm](h, lr, gscale)
    return np.hstack([rows, np.ones((rows.shape[0], 1))])


LAMB_LR_COLUMN = COMMON_COLUMNS + 8


def nadam_mu(h: SegmentHyper) -> F64:
    """NAdam's mu_t for the step about to be taken (to advance ``mu_product``)."""
    t = h.step.astype(np.float64)
    return h["beta1"] * (1.0 - 0.5 * (0.96 ** (t * h["momentum_decay"])))


def lamb_trust_ratio(param_sumsq: F64, update_sumsq: F64) -> F64:
    """||p|| / ||r|| per tensor, 1 where either norm is zero (optax.scale_by_trust_ratio)."""
    pn = np.sqrt(param_sumsq)
    un = np.sqrt(update_sumsq)
    zero = (pn == 0.0) | (un == 0.0)
    return np.where(zero, 1.0, pn / np.where(zero, 1.0, un))


def clip_coefficients(
    seg_sumsq: F64, max_norm: float | None, per_tensor: bool,
    total_sumsq: float | None = None,
) -> tuple[F64, float]:
    """Gradient scale per segment and the (global) gradient norm.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: scale by
    ``max_norm / (norm + 1e-6)`` when that is below one. ``total_sumsq`` replaces
    the sum over ``seg_sumsq`` when the segments are only part of the gradient.
    """
    total = float(np.sqrt(seg_sumsq.sum() if total_sumsq is None else total_sumsq))
    ones = np.ones_like(seg_sumsq)
    if max_norm is None:
        return ones, total
    if per_tensor:
        coef = max_norm / (np.sqrt(seg_sumsq) + 1e-6)
        return np.minimum(coef, 1.0), total
    coef_g = max_norm / (total + 1e-6)
    return ones * min(coef_g, 1.0), total


def initial_slot_value(algorithm: Algorithm, slot: str, h: Mapping[str, HyperValue]) -> float:
    """Adagrad's accumulator starts at ``initial_accumulator_value``; all else at 0."""
    if algorithm is Algorithm.ADAGRAD and slot == "sum":
        return float(h["initial_accumulator_value"])
    return 0.0
