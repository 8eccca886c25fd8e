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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.errors import shown
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


class HyperparameterError(ValueError):
    """A hyperparameter is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """What one algorithm keeps and accepts.

    ``defaults`` are the shared table's (:mod:`adamserve_proto.algorithms`: torch.optim's,
    LAMB optax.lamb's, with the server's extras), numbers as floats and ``betas``
    flattened to ``beta1``/``beta2``, so every value is a plain float or bool.
    ``bools``: the keys whose values are true/false.
    """

    algorithm: Algorithm
    defaults: Mapping[str, HyperValue]
    bools: frozenset[str] = field(default_factory=frozenset)

    def slots(self, h: Mapping[str, HyperValue]) -> tuple[str, ...]:
        """The per-element state buffers for one group, in torch's state_dict names."""
        a = self.algorithm
        if a in (Algorithm.ADAM, Algorithm.ADAMW):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if h["amsgrad"] else (
                "exp_avg", "exp_avg_sq")
        if a in (Algorithm.NADAM, Algorithm.RADAM, Algorithm.LAMB):
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


def _spec(row: table.AlgorithmDef) -> AlgorithmSpec:
    defaults: Hyperparameters = table.split_betas(row.wire_defaults())
    bools = frozenset(k for k, v in defaults.items() if isinstance(v, bool))
    return AlgorithmSpec(Algorithm(row.runs), defaults, bools)


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
_UNIT_INTERVAL = ("beta1", "beta2", "alpha")

# The largest hyperparameter (lr, eps, weight_decay, momentum, ...), max_grad_norm and
# schedule factor a session takes: far past any training's, and small enough that no
# coefficient a step computes from them (lr · factor / div_factor / final_div_factor,
# lr / (1 - beta1^t), 1 - lr · weight_decay) leaves float32's range, so nothing a
# client sets can overflow into an Inf that no answer could carry.
MAX_VALUE = 1e6


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
    """Validate ``given`` over ``base`` (default: the algorithm's defaults).

    Accepts torch's ``betas=(b1, b2)`` as well as ``beta1``/``beta2``. Numbers are
    finite: ``beta1``, ``beta2``, ``alpha`` in [0, 1), the others in [0, MAX_VALUE].
    Raises :class:`HyperparameterError` naming the offending key and what was expected.
    """
    spec = SPECS[algorithm]
    out: Hyperparameters = dict(base if base is not None else spec.defaults)
    items = dict(given)
    if "betas" in items:
        betas = items.pop("betas")
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise HyperparameterError(f"betas: expected a pair (beta1, beta2), got "
                                      f"{shown(betas)}")
        items.setdefault("beta1", betas[0])
        items.setdefault("beta2", betas[1])
    for key, value in items.items():
        if key not in spec.defaults:
            raise HyperparameterError(
                f"unknown hyperparameter {shown(key)} for {algorithm.value}; expected one of "
                f"{', '.join(sorted(spec.defaults))}"
            )
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
        if key in _UNIT_INTERVAL and not 0.0 <= number < 1.0:
            raise HyperparameterError(f"{key}: expected a value in [0, 1), got {number!r}")
        if key not in _UNIT_INTERVAL and number < 0.0:
            raise HyperparameterError(f"{key}: expected a value >= 0, got {number!r}")
        if key not in _UNIT_INTERVAL and number > MAX_VALUE:
            raise HyperparameterError(
                f"{key}: expected a value in [0, {MAX_VALUE:g}], got {number!r}")
        out[key] = number
    return out


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


COEFFICIENTS = {
    Algorithm.ADAM: _adam,
    Algorithm.ADAMW: _adam,
    Algorithm.NADAM: _nadam,
    Algorithm.RADAM: _radam,
    Algorithm.ADAMAX: _adamax,
    Algorithm.ADAGRAD: _adagrad,
    Algorithm.RMSPROP: _rmsprop,
    Algorithm.LAMB: _lamb,
}


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
