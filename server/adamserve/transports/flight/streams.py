"""One step over several DoExchange streams (``FlightCommand.streams``).

The client cuts the step's gradients into contiguous parts in flat order and sends
part i on stream i, all at once, so the bytes arrive over several gRPC streams (and
connections' worth of flow-control windows) in parallel. The server reads every
stream concurrently in Arrow's threads; stream 0 runs the step, feeding the service
its own rows and then those of streams 1, 2, ... in order, so each tensor's rows
still arrive in order. Streams 1.. hand their rows over and wait for the outcome;
every stream then answers the status and the parameters of the rows it carried.

A stream that never comes, or fails, fails the whole step before anything is
applied (the service checks the whole request first): every stream of the step
gets the error. Parts wait at most :data:`STREAM_WAIT` seconds for each other.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from adamserve import errors
from adamserve.engine.dtypes import itemsize
from adamserve.service import StepResult, TensorChunk
from adamserve.service.waits import MAX_WAIT
from adamserve.sessions import names

MAX_STREAMS = 16
# Steps whose streams may be meeting at once, on one server, and of one tenant.
MAX_GATHERS = 64
MAX_GATHERS_PER_TENANT = 16
# Seconds the streams of one step wait for each other (to arrive, to hand over rows).
STREAM_WAIT = 30.0
_ID = 128  # the longest streams.id


@dataclass(frozen=True)
class Row:
    """Where one row a stream carried lies: the parameters it gets back."""

    name: str
    offset: int
    count: int


_END = object()  # a part's rows are all handed over


@dataclass
class Gather:
    """The streams of one step meeting: rows handed to stream 0, and the outcome."""

    count: int
    header: bytes  # the step's header, serialised: every stream must carry the same
    limit: int  # the most gradient bytes all streams together may hand over
    wait: float = STREAM_WAIT
    handed: int = 0  # bytes handed over by streams 1..
    parts: list[queue.SimpleQueue[object]] = field(default_factory=list)
    arrived: set[int] = field(default_factory=set)
    leader: threading.Event = field(default_factory=threading.Event)  # stream 0 came
    done: threading.Event = field(default_factory=threading.Event)
    result: StepResult | None = None
    error: BaseException | None = None
    # the session's memory counts what the meeting may hold (handed-over rows) until
    # it closes: the store's reserved() block, entered here and left in close()
    held: contextlib.AbstractContextManager[None] | None = None

    def __post_init__(self) -> None:
        self.parts = [queue.SimpleQueue() for _ in range(self.count)]

    def rows_of(self, index: int) -> Iterator[TensorChunk]:
        """The rows stream ``index`` hands over, as they come; its failure re-raised."""
        deadline = time.monotonic() + self.wait
        while True:
            try:
                item = self.parts[index].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise errors.InvalidArgument(
                    f"stream {index} of a step sent over {self.count} Flight streams did not "
                    f"arrive or stalled for {self.wait:g} s: nothing was applied"
                ) from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TensorChunk)
            deadline = time.monotonic() + self.wait
            yield item

    def finish(self, result: StepResult | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def outcome(self) -> StepResult:
        """Stream 0's result, for the other streams (waiting for it)."""
        # the step itself may wait for a round (bounded by the service's MAX_WAIT)
        if not self.leader.wait(self.wait) or not self.done.wait(self.wait + MAX_WAIT):
            raise errors.InvalidArgument(
                f"stream 0 of a step sent over {self.count} Flight streams did not arrive in "
                f"{self.wait:g} s: nothing was applied")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Gathers:
    """The steps whose streams are meeting, by (session, streams.id)."""

    def __init__(self, wait: float = STREAM_WAIT) -> None:
        self.wait = wait
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], Gather] = {}

    def join(self, session_id: str, streams_id: str, count: int, index: int, header: bytes,
             limit: int,
             hold: Callable[[int], contextlib.AbstractContextManager[None]] | None = None
             ) -> Gather:
        """The meeting of the step ``streams_id`` of ``session_id`` (qualified: tenants'
        meetings never mix), for stream ``index`` (whose header, serialised, is
        ``header``); ``limit``: the session's bytes, the most its streams may hand over;
        ``hold(limit)``: counts those bytes against the memory caps while it meets."""
        if not 0 < len(streams_id) <= _ID:
            raise errors.InvalidArgument(f"streams.id: expected 1 to {_ID} characters")
        if not 2 <= count <= MAX_STREAMS:
            raise errors.InvalidArgument(
                f"streams.count {count}: expected 2 to {MAX_STREAMS} streams")
        if not 0 <= index < count:
            raise errors.InvalidArgument(
                f"streams.index {index}: expected 0 to {count - 1}")
        key = (session_id, streams_id)
        with self._lock:
            g = self._open.get(key)
            if g is None:
                tenant = names.split(session_id)[0]
                if sum(names.split(k[0])[0] == tenant for k in self._open) >= (
                        MAX_GATHERS_PER_TENANT):
                    raise errors.TooManyRequests(
                        f"{MAX_GATHERS_PER_TENANT} of this tenant's steps sent over several "
                        "Flight streams are meeting already: send this one later, or over "
                        "one stream", reason="TOO_MANY_STREAMS", retry_after=1.0)
                if len(self._open) >= MAX_GATHERS:
                    raise errors.ResourceExhausted(
                        f"{MAX_GATHERS} steps sent over several Flight streams are meeting "
                        "on this server already: send this one later, or over one stream")
                g = Gather(count, header, limit, self.wait)
                if hold is not None:
                    g.held = hold(limit)
                    g.held.__enter__()  # QUOTA_EXCEEDED before the meeting opens
                self._open[key] = g
            if g.header != header:
                raise errors.InvalidArgument(
                    f"streams.index {index}: its step header differs from another stream's "
                    "of this step (every stream carries the same header)")
            if g.count != count:
                raise errors.InvalidArgument(
                    f"streams.count {count}: another stream of this step said {g.count}")
            if index in g.arrived:
                raise errors.InvalidArgument(
                    f"streams.index {index}: this step already has a stream {index}")
            g.arrived.add(index)
            if index == 0:
                g.leader.set()
            return g

    def close(self, session_id: str, streams_id: str) -> None:
        with self._lock:
            g = self._open.pop((session_id, streams_id), None)
        if g is not None and g.held is not None:
            g.held.__exit__(None, None, None)


def hand_over(g: Gather, index: int, chunks: Iterable[TensorChunk], rows: list[Row]) -> None:
    """Stream ``index`` (> 0): pass its rows to stream 0, recording where they lie. The
    rows wait in memory until stream 0 reads them: all streams together may hand over
    no more than the session's bytes."""
    try:
        for chunk in chunks:
            g.handed += len(chunk.data)  # one thread per stream; a race only loosens it
            if g.handed > g.limit:
                raise errors.InvalidArgument(
                    f"the streams of this step carry more than the session's {g.limit} "
                    "bytes of gradients")
            rows.append(Row(chunk.name, chunk.offset,
                            len(chunk.data) // itemsize(chunk.datatype)))
            g.parts[index].put(chunk)
    except BaseException as exc:
        g.parts[index].put(exc)
        raise
    g.parts[index].put(_END)


def recorded(chunks: Iterable[TensorChunk], rows: list[Row]) -> Iterator[TensorChunk]:
    """Stream 0's own rows, recorded as they pass."""
    for chunk in chunks:
        rows.append(Row(chunk.name, chunk.offset, len(chunk.data) // itemsize(chunk.datatype)))
        yield chunk


def share(params: list[TensorChunk], rows: list[Row]) -> list[TensorChunk]:
    """The parameters of the rows one stream carried (views of the step's values)."""
    by_name = {c.name: c for c in params}
    out = []
    for r in rows:
        c = by_name.get(r.name)
        if c is None:
            continue
        size = itemsize(c.datatype)
        data = memoryview(c.data).cast("B")[r.offset * size:(r.offset + r.count) * size]
        out.append(TensorChunk(c.name, c.shape, c.datatype, data, r.offset))
    return out
