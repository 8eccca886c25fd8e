"""Exactly-once pushes: which (worker, sequence) pairs a session has applied.

Every push may carry a worker id and a sequence number (1, 2, 3, ... per worker). A
push seen before is acknowledged and not applied again, whether it is a retry, a
duplicate or arrives out of order. Per worker the log keeps a low-water mark (every
sequence up to it was applied, or is too old to tell) and the applied sequences in a
window of ``WINDOW`` above it, so it stays small even when sequences are skipped (a
step refused or skipped for non-finite gradients leaves a gap). It is saved with
every checkpoint, so it holds across a restart. :class:`PushId` names one push.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adamserve.errors import InvalidArgument, shown

WINDOW = 1024  # how far out of order a worker's pushes may arrive
MAX_WORKERS = 4096  # the least recently seen worker's record is dropped beyond this


@dataclass(frozen=True)
class PushId:
    """Who sent a push: a worker id and its sequence number (1, 2, ...), for exactly-once."""

    worker: str
    sequence: int

    def check(self) -> None:
        if not self.worker or len(self.worker) > 128:
            raise InvalidArgument(f"worker_id {shown(self.worker)}: expected 1-128 characters")
        if self.sequence < 1:
            raise InvalidArgument(f"sequence {self.sequence}: expected an integer >= 1")


def as_pushes(push: PushId | None) -> dict[str, int]:
    """One push as a step's record of its pushes (worker -> sequence)."""
    return {} if push is None else {push.worker: push.sequence}


@dataclass
class _Worker:
    low: int = 0
    high: int = 0
    above: set[int] = field(default_factory=set)


class PushLog:
    def __init__(self) -> None:
        self._workers: OrderedDict[str, _Worker] = OrderedDict()

    def seen(self, worker: str, sequence: int) -> bool:
        """Applied before, or older than the window (then it cannot be told: refused as
        a duplicate rather than risk applying it twice)."""
        w = self._workers.get(worker)
        return w is not None and (sequence <= w.low or sequence in w.above)

    def check(self, worker: str, sequence: int) -> None:
        """Raise ValueError for a sequence implausibly far ahead of the worker's last."""
        w = self._workers.get(worker, _Worker())
        if sequence > w.high + WINDOW:
            raise ValueError(
                f"push sequence {sequence} of worker {worker!r} is more than {WINDOW} ahead "
                f"of its latest applied one ({w.high})")

    def record(self, worker: str, sequence: int) -> None:
        w = self._workers.setdefault(worker, _Worker())
        self._workers.move_to_end(worker)
        w.above.add(sequence)
        w.high = max(w.high, sequence)
        w.low = max(w.low, w.high - WINDOW)
        while w.low + 1 in w.above:
            w.low += 1
        w.above = {s for s in w.above if s > w.low}
        while len(self._workers) > MAX_WORKERS:
            self._workers.popitem(last=False)

    def to_json(self) -> dict[str, Any]:
        return {k: {"low": w.low, "high": w.high, "above": sorted(w.above)}
                for k, w in self._workers.items()}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> PushLog:
        log = PushLog()
        for worker, entry in data.items():
            above = {int(x) for x in entry["above"]}
            low = int(entry["low"])
            log._workers[str(worker)] = _Worker(low, int(entry.get("high", max(above, default=low))),
                                                above)
        return log
