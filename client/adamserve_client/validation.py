"""torch.optim's argument checks, raised in the client before any network call.

Filled in to match torch 2.13's ``torch/optim/*.py`` exactly (exception types and
messages), so code that catches torch's errors catches ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_constructor", "check_step"]


def check_constructor(algorithm: str, hyper: Mapping[str, Any]) -> None:
    """Raise what ``torch.optim.<algorithm>(params, **hyper)`` raises in its constructor.

    ``algorithm``: the client's key (adam, amsgrad, adamw, nadam, radam, adamax, adagrad,
    rmsprop, lamb); ``hyper``: the defaults merged with the caller's keyword arguments,
    under torch's names (including foreach, fused, capturable, differentiable).
    """


def check_step(algorithm: str, groups: Sequence[Mapping[str, Any]], params: Sequence[Any]) -> None:
    """Raise what torch raises at the first ``step()`` on the CPU for these groups and
    parameters (for example ``capturable=True`` with CPU tensors)."""
