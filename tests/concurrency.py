"""Calls run side by side, as several workers of one session make them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def in_threads(*calls: Callable[[], Any], timeout: float = 60.0) -> list[Any]:
    """Run each call in its own thread; their results (or raised exceptions) in order."""
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out
