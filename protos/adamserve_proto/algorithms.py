"""The algorithms a session can run, as data: the one table of names and defaults.

One row per name a client may ask for. ``runs``: the server algorithm that does the
maths (``amsgrad`` runs Adam with ``amsgrad=True``: its ``options``). ``defaults``:
the hyperparameters under torch.optim's names (``betas`` a pair), with torch.optim's
defaults exactly as its constructors write them (``weight_decay=0`` where torch
writes ``0``), in the order the server lists them; LAMB, which torch lacks, takes
optax.lamb's (the paper's). ``extras``: what the server accepts beyond torch's class
(Adam's ``bias_correction``), with the server's default; torch's param groups do not
carry them.

Plain Python, importable by both sides, so that each default is written once: the
server's engine (``adamserve.engine.algorithms``) derives its specs from it, and the
client (``adamserve_client.optim``) its generic defaults and the default arguments
of its torch-signature classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ALGORITHMS", "SWITCHES", "AlgorithmDef", "WireValue", "wire_value"]

# A hyperparameter as the wire carries it: true/false, a number, or betas as a pair.
WireValue = bool | float | tuple[float, ...]


def wire_value(value: Any) -> WireValue:
    """A default as the wire carries it: bools stay, numbers become floats, pairs of floats."""
    if isinstance(value, bool):
        return value
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    return float(value)


@dataclass(frozen=True)
class AlgorithmDef:
    """One name a session may be created with (see the module docstring)."""

    name: str
    runs: str
    defaults: Mapping[str, Any]
    extras: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("defaults", "extras", "options"):  # read-only: both sides share them
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def keys(self) -> frozenset[str]:
        """Every hyperparameter the server accepts for it, under torch's names."""
        return frozenset(self.defaults) | frozenset(self.extras)

    def wire_defaults(self, extras: bool = True) -> dict[str, WireValue]:
        """The defaults (with the extras, unless told not to) as the wire carries them."""
        given = {**self.defaults, **self.extras} if extras else self.defaults
        return {k: wire_value(v) for k, v in given.items()}

    def alias(self, name: str, **options: Any) -> AlgorithmDef:
        """Another name for this algorithm with ``options`` set."""
        return AlgorithmDef(name, self.runs, {**self.defaults, **options}, self.extras,
                            options)


# torch.optim's implementation switches, with torch's defaults: they pick an
# implementation, not the maths, so they stay in the client's param groups (its
# state_dicts look like torch's) and never travel.
SWITCHES: Mapping[str, Any] = MappingProxyType({
    "foreach": None, "fused": None, "capturable": False, "differentiable": False,
})

_ADAM_FAMILY: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "maximize": False,
}
_BIAS_CORRECTION = {"bias_correction": True}

ADAM = AlgorithmDef("adam", "adam", {
    **_ADAM_FAMILY, "amsgrad": False, "decoupled_weight_decay": False,
}, extras=_BIAS_CORRECTION)
ADAMW = AlgorithmDef("adamw", "adamw", {
    **_ADAM_FAMILY, "weight_decay": 1e-2, "amsgrad": False, "decoupled_weight_decay": True,
}, extras=_BIAS_CORRECTION)
NADAM = AlgorithmDef("nadam", "nadam", {
    **_ADAM_FAMILY, "lr": 2e-3, "momentum_decay": 4e-3, "decoupled_weight_decay": False,
})
RADAM = AlgorithmDef("radam", "radam", {**_ADAM_FAMILY, "decoupled_weight_decay": False})
ADAMAX = AlgorithmDef("adamax", "adamax", {**_ADAM_FAMILY, "lr": 2e-3})
ADAGRAD = AlgorithmDef("adagrad", "adagrad", {
    "lr": 1e-2, "lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0,
    "eps": 1e-10, "maximize": False,
})
RMSPROP = AlgorithmDef("rmsprop", "rmsprop", {
    "lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0, "momentum": 0,
    "centered": False, "maximize": False,
})
# optax.lamb: b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0 (lr has no default there)
LAMB = AlgorithmDef("lamb", "lamb", {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "maximize": False,
    "bias_correction": True,
})

ALGORITHMS: Mapping[str, AlgorithmDef] = MappingProxyType({a.name: a for a in (
    ADAM, ADAM.alias("amsgrad", amsgrad=True), ADAMW, NADAM, RADAM, ADAMAX, ADAGRAD,
    RMSPROP, LAMB,
)})
