"""Many workers on one session: how their pushes become steps.

Synchronous mode: step ``t`` applies the mean of the gradients the session's K
workers computed from the parameters of step ``t - 1``. Pushes for the open round
are summed into an accumulator; the round closes when K have arrived (or when the
straggler timeout passes: it then fails, or applies the mean of what arrived), and
every worker waiting on it gets the same outcome.

Asynchronous mode: each push is applied on arrival; a push names the step its
gradient was computed from, and one more than ``max_staleness`` steps behind is
refused (optionally, lr is scaled by ``1 / (1 + staleness)``).

Exchange (two-phase steps): a session that is one shard of a model whose step
needs whole-gradient quantities (LAMB's trust ratio over a split tensor, global
clipping, the non-finite check) does not apply a closed round. It keeps the mean
gradient staged and reports its per-tensor sums of squares; the step is applied
when a commit brings the sums over every shard.

This module holds what configures a session's workers and how a round ended;
:mod:`adamserve.sessions.coordinator` runs the rounds (their states and buffers), and
``docs/exchange.md`` describes the two-phase exchange end to end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adamserve.errors import shown

MODES = ("sync", "async")
POLICIES = ("fail", "apply")
# Each worker waiting for its round holds a server thread (the transports have 1024).
MAX_WORKERS = 512


@dataclass(frozen=True)
class WorkersConfig:
    """How the pushes of a session's workers become steps (see the module docstring)."""

    count: int = 1
    mode: str = "sync"
    straggler_timeout: float = 0.0  # seconds from a round's first push; 0: wait forever
    straggler_policy: str = "fail"  # "fail" the round, or "apply" the mean of what arrived
    max_staleness: int | None = None  # async: refuse pushes more steps behind than this
    scale_lr_by_staleness: bool = False  # async: lr * 1 / (1 + staleness)
    exchange: bool = False  # a shard: closed rounds wait for a commit with global sums

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not 1 <= self.count <= MAX_WORKERS:
            raise ValueError(f"workers: expected 1 to {MAX_WORKERS}, got {self.count}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {shown(self.mode)}")
        if self.straggler_policy not in POLICIES:
            raise ValueError(f"straggler_policy: expected one of {', '.join(POLICIES)}, got "
                             f"{shown(self.straggler_policy)}")
        if not (self.straggler_timeout >= 0 and np.isfinite(self.straggler_timeout)):
            raise ValueError(f"straggler_timeout: expected seconds >= 0, got "
                             f"{shown(self.straggler_timeout)}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness: expected an integer >= 0, got "
                             f"{self.max_staleness}")
        if self.exchange and self.mode == "async":
            raise ValueError("mode 'async' cannot be combined with exchange (two-phase steps "
                             "across shards need rounds): use mode 'sync', or a step that "
                             "needs no whole-gradient quantity")
        if self.exchange and self.straggler_timeout > 0:
            raise ValueError("straggler_timeout cannot be combined with exchange: each shard "
                             "would time out on its own and the shards could apply different "
                             "steps; leave it 0")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: Mapping[str, Any] | None) -> WorkersConfig:
        if not d:
            return WorkersConfig()
        staleness = d.get("max_staleness")
        return WorkersConfig(
            count=int(d.get("count", 1)), mode=str(d.get("mode", "sync")),
            straggler_timeout=float(d.get("straggler_timeout", 0.0)),
            straggler_policy=str(d.get("straggler_policy", "fail")),
            max_staleness=None if staleness is None else int(staleness),
            scale_lr_by_staleness=bool(d.get("scale_lr_by_staleness", False)),
            exchange=bool(d.get("exchange", False)))


@dataclass
class Outcome:
    """How a round ended, for every worker that waits on it."""

    step: int  # the step the round was for (the session's step count once applied)
    round: int = 0  # the round's id
    skipped: bool = False
    grad_norm: float | None = None
    nonfinite: tuple[str, ...] = ()
    contributors: int = 0
    missing: tuple[str, ...] = ()
    error: str | None = None  # the round failed: nothing was applied
