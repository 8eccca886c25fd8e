"""Learning-rate schedules: step -> lr, in closed form.

A schedule maps the session's step count ``t`` (0 for the first update, as torch's
schedulers and optax do) and a group's base lr to the lr of that update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class Schedule(Protocol):
    def lr(self, step: int, base_lr: float) -> float: ...

    def beta1(self, step: int, base_beta1: float) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Constant:
    """lr = base_lr · factor."""

    factor: float = 1.0

    def lr(self, step: int, base_lr: float) -> float:
        return base_lr * self.factor

    def beta1(self, step: int, base_beta1: float) -> float:
        return base_beta1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "constant", "factor": self.factor}
