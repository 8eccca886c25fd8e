"""Exactly-once pushes: which (worker, sequence) pairs a session has applied.

Every push may carry a worker id and a sequence number (1, 2, 3, ... per worker). A
push seen before is acknowledged and not applied again, whether it is a retry, a
duplicate or arrives out of order. Per worker the log keeps a low-water mark (every
sequence up to it was applied) and the applied sequences above it, so it stays small
while pushes arrive roughly in order. It is saved with every checkpoint, so it holds
across a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_AHEAD = 1 << 16  # applied sequences a worker may have above its low-water mark


@dataclass
class _Worker:
    low: int = 0
    above: set[int] = field(default_factory=set)


class PushLog:
    def __init__(self) -> None:
        self._workers: dict[str, _Worker] = {}

    def seen(self, worker: str, sequence: int) -> bool:
        w = self._workers.get(worker)
        return w is not None and (sequence <= w.low or sequence in w.above)

    def check(self, worker: str, sequence: int) -> None:
        """Raise ValueError when recording this push would exceed the log's bound."""
        w = self._workers.get(worker, _Worker())
        if sequence > w.low + MAX_AHEAD:
            raise ValueError(
                f"push sequence {sequence} of worker {worker!r} is more than {MAX_AHEAD} ahead "
                f"of its oldest missing one ({w.low + 1})")

    def record(self, worker: str, sequence: int) -> None:
        w = self._workers.setdefault(worker, _Worker())
        w.above.add(sequence)
        while w.low + 1 in w.above:
            w.above.remove(w.low + 1)
            w.low += 1

    def to_json(self) -> dict[str, Any]:
        return {k: {"low": w.low, "above": sorted(w.above)} for k, w in self._workers.items()}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> PushLog:
        log = PushLog()
        for worker, entry in data.items():
            log._workers[str(worker)] = _Worker(int(entry["low"]),
                                                {int(x) for x in entry["above"]})
        return log
