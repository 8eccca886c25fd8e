"""optax 0.2's aliases as remote optimizers: sessions with ``semantics="optax"``.

``adam(params, learning_rate, b1=0.9, ..., *, nesterov=False, server=..., **options)``
and likewise ``adamw``, ``nadam``, ``nadamw``, ``radam``, ``amsgrad``, ``adamax``,
``lamb`` and ``adafactor``: each takes its optax alias's arguments, in optax's order
with optax's defaults (the table's ``optax.<alias>`` rows, :mod:`adamserve_proto.algorithms`),
then ``server`` and the options of :class:`~adamserve_client.optim.RemoteOptimizer`
(``session``, ``schedule``, ``master_dtype``, ...), and returns that RemoteOptimizer.
A dtype (``mu_dtype``, ``dtype_momentum``) may be a name or a dtype (``jnp.float32``).

Not taken: optax's masks (``mask``, ``weight_decay_mask``) and callables as
hyperparameters (a schedule as ``learning_rate``: a server ``schedule`` scales
``learning_rate`` instead). The update rules, the state's names and what the server
refuses: docs/optax.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from adamserve_client.optim import RemoteOptimizer
from adamserve_proto.algorithms import ALGORITHMS, CHOICES, OPTAX_DTYPES, qualified

__all__ = ["adafactor", "adam", "adamax", "adamw", "amsgrad", "lamb", "nadam", "nadamw",
           "radam"]

# optax's keyword-only arguments (``*, nesterov``)
_KEYWORD_ONLY = frozenset({"nesterov"})
_DTYPE_KEYS = frozenset(k for k, v in CHOICES.items() if v is OPTAX_DTYPES)


def _dtype_name(value: Any) -> Any:
    """A dtype argument as the wire names it: None or a string kept, a dtype (NumPy's,
    jax's scalar types) by its name."""
    if value is None or isinstance(value, str):
        return value
    try:
        return np.dtype(value).name
    except TypeError:
        return value  # the server names what it takes


def _signature(row_name: str) -> inspect.Signature:
    row = ALGORITHMS[row_name]
    empty, P = inspect.Parameter.empty, inspect.Parameter
    args = [P("params", P.POSITIONAL_OR_KEYWORD)]
    args += [P(key, P.KEYWORD_ONLY if key in _KEYWORD_ONLY else P.POSITIONAL_OR_KEYWORD,
               default=empty if key in row.required else default)
             for key, default in row.defaults.items() if key not in _KEYWORD_ONLY]
    args += [P(key, P.KEYWORD_ONLY, default=row.defaults[key])
             for key in row.defaults if key in _KEYWORD_ONLY]
    args += [P("server", P.KEYWORD_ONLY, default=None), P("options", P.VAR_KEYWORD)]
    return inspect.Signature(args)


def _alias(alias: str) -> Callable[..., RemoteOptimizer]:
    """The constructor of optax's ``alias`` (one factory for all nine)."""
    row_name = qualified(alias, "optax")
    signature = _signature(row_name)

    def constructor(*args: Any, **kwargs: Any) -> RemoteOptimizer:
        bound = signature.bind(*args, **kwargs)
        given = dict(bound.arguments)
        params = given.pop("params")
        server = given.pop("server", None)
        options: Mapping[str, Any] = given.pop("options", {})
        hyper = {k: _dtype_name(v) if k in _DTYPE_KEYS else v for k, v in given.items()}
        return RemoteOptimizer(params, alias, semantics="optax", server=server,
                               **options, **hyper)

    constructor.__name__ = constructor.__qualname__ = alias
    constructor.__signature__ = signature  # type: ignore[attr-defined]
    constructor.__doc__ = (f"optax.{alias}'s arguments and defaults ({signature}), as a "
                           "RemoteOptimizer of semantics 'optax' (docs/optax.md).")
    return constructor


adam = _alias("adam")
adamw = _alias("adamw")
nadam = _alias("nadam")
nadamw = _alias("nadamw")
radam = _alias("radam")
amsgrad = _alias("amsgrad")
adamax = _alias("adamax")
lamb = _alias("lamb")
adafactor = _alias("adafactor")
