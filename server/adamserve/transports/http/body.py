"""Request bodies read as they arrive, never held whole.

A route reads the JSON part of a body on the event loop (:func:`open_body`; the
headers are checked first, so a JSON part over the limit or longer than the
Content-Length is refused before a byte of it is read) and hands the rest, a
:class:`Payload`, to the worker thread that runs the service. The service asks for
the tensors' bytes only after it has looked the session up and admitted the
request, so an unknown session or a refused push costs no upload.

The worker is handed views of the very messages the server received (the
service's decode is the one copy), fetched from the event loop in batches of about
:data:`PIECE` bytes: one trip between the threads per batch, not per message, and
the next batch is received while the service decodes this one, so at most two
batches are held. What arrived together with the JSON part (all of a small body)
needs no trip at all.

What bodies hold, all requests together, is bounded by a :class:`BodyBudget`: the
app's gate takes each request's :class:`Share` of it before the body is read (after
the key, the caller's role and the session were checked), so that many large bodies
at once wait, then are refused (429), rather than being buffered side by side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from adamserve.errors import InvalidArgument, ResourceExhausted, TooManyRequests
from adamserve.transports.http.binary import HEADER_LENGTH, OCTET_STREAM, PIECE, header_length

IDLE_TIMEOUT = 60.0  # seconds a body may send nothing before it is refused (default)

# -- the budget: bytes of bodies held at once, all requests together -----------------

DEFAULT_BUFFERED_BYTES = 1 << 30
# A JSON body is held whole, then parsed: pydantic's objects take several times its
# bytes (measured: 3.6x for 9-digit floats, 16x for "0.5,"), so it counts this many.
JSON_EXPANSION = 16
# What a binary body holds of its tensor bytes at once: the batch being decoded, the
# one received ahead of it, and what the server's protocol buffers.
STREAM_WINDOW = 2 * PIECE + (64 << 10)
BUDGET_WAIT = 2.0  # seconds a request waits for room in the budget before it is refused
BUDGET_RETRY_AFTER = 1.0


class BodyBudget:
    """The bytes of request bodies the HTTP server holds at once, all requests together
    (``--http-max-buffered-bytes``). A request takes what it holds as its bytes arrive
    (:class:`Share`), waiting up to ``wait`` seconds for room, refused past that (429
    with Retry-After); one request may hold at most the whole budget. Used on the
    server's event loop only."""

    def __init__(self, total: int, wait: float = BUDGET_WAIT) -> None:
        if total < 1:
            raise ValueError(f"max buffered bytes {total}: expected at least 1")
        self.total = total
        self.wait = wait
        self.used = 0
        self._freed = asyncio.Event()  # set whenever bytes are given back

    async def take(self, nbytes: int) -> None:
        if self.used + nbytes > self.total:
            try:
                async with asyncio.timeout(self.wait):
                    while self.used + nbytes > self.total:
                        self._freed.clear()
                        await self._freed.wait()
            except TimeoutError:
                raise TooManyRequests(
                    f"the server holds {self.used} bytes of request bodies, its limit is "
                    f"{self.total} and this one needs {nbytes} more: retry in "
                    f"{BUDGET_RETRY_AFTER:g} s", reason="QUOTA_EXCEEDED",
                    retry_after=BUDGET_RETRY_AFTER, metadata={
                        "limit": "http_max_buffered_bytes", "bytes": str(nbytes)}) from None
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        if nbytes > 0:
            self.used -= nbytes
            self._freed.set()


class Share:
    """What one request's body holds of the budget: a JSON body (or a raw one: a state
    blob) is held whole, until the request ends; a binary body (``json_part`` bytes of
    JSON) holds its JSON part, and of its tensor bytes only those streaming by
    (:data:`STREAM_WINDOW`, given back once the body has arrived). A body of known
    ``length`` takes its share whole before it is read (:meth:`start`: all or nothing, so
    that bodies waiting for room hold none of it); one of unknown length (chunked) as
    its bytes arrive."""

    def __init__(self, budget: BodyBudget, length: int | None, json_part: int | None,
                 raw: bool) -> None:
        self.budget = budget
        self.length = length
        self.json_part = json_part
        self.factor = 1 if raw else JSON_EXPANSION
        self.taken = 0

    def _held(self, received: int, ended: bool) -> int:
        n = self.json_part
        if n is None:
            held = received * self.factor
        else:
            streaming = 0 if ended else min(max(received - n, 0), STREAM_WINDOW)
            held = min(received, n) * JSON_EXPANSION + streaming
        return min(held, self.budget.total)

    async def _hold(self, want: int) -> None:
        if want > self.taken:
            await self.budget.take(want - self.taken)
        else:
            self.budget.give(self.taken - want)
        self.taken = want

    async def start(self) -> None:
        """Before the body is read: its whole share, if its length is known."""
        if self.length is not None:
            await self._hold(self._held(self.length, ended=False))

    async def received(self, total: int, more: bool) -> None:
        """``total`` bytes of the body have arrived (``more``: not all of them yet)."""
        await self._hold(self._held(total if self.length is None else self.length,
                                    ended=not more))

    def release(self) -> None:
        self.budget.give(self.taken)
        self.taken = 0


async def _message(receive: Receive) -> tuple[bytes, bool]:
    """The next part of the body and whether more follows."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message.get("body", b""), bool(message.get("more_body", False))


@dataclass
class Body:
    """A request's JSON part (all of a JSON request) and what follows it.

    ``binary``: the body is in the binary layout (it has a header length).
    """

    json: memoryview
    binary: bool
    payload: Payload


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    return int(raw) if raw is not None and raw.isdigit() else None


async def open_body(request: Request, max_json_bytes: int,
                    idle_timeout: float = IDLE_TIMEOUT) -> Body:
    """Read the JSON part of ``request``'s body and leave the rest unread.

    A JSON body is read whole (the gate caps it). A binary body's header length is
    checked against the JSON limit and the Content-Length before anything is read.
    The rest may pause ``idle_timeout`` seconds at most.
    """
    headers = request.headers
    n = header_length(headers)
    length = _content_length(request)
    if n is None and headers.get("content-type", "").split(";")[0].strip().lower() == OCTET_STREAM:
        raise InvalidArgument(
            f"a binary (application/octet-stream) request needs a {HEADER_LENGTH} header "
            "giving the length of its JSON part")
    if n is not None:
        if n > max_json_bytes:
            raise ResourceExhausted(
                f"the JSON part of the request is {n} bytes; the limit is {max_json_bytes} "
                "(send large tensors in the binary form)")
        if length is not None and n > length:
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {n} bytes, beyond the body's {length} bytes")
    parts: list[bytes] = []
    have = 0
    more = True
    while more and (n is None or have < n):
        data, more = await _message(request.receive)
        if data:
            parts.append(data)
            have += len(data)
    if n is not None and have < n:
        raise InvalidArgument(f"{HEADER_LENGTH} is {n} bytes, beyond the body's {have} bytes")
    whole = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
    cut = len(whole) if n is None else n
    payload = Payload(request.receive, asyncio.get_running_loop(), whole[cut:], more,
                      None if length is None else length - cut, idle_timeout)
    return Body(whole[:cut], n is not None, payload)


class Payload:
    """The bytes of a body after its JSON part, read in order by one worker thread.

    ``length``: how many there are (from the Content-Length); None for a chunked body.
    :meth:`expect` says how many the JSON part declares, so nothing past them is
    asked for. :meth:`read` hands out views of the very messages the server received,
    never a copy (the service's decode is the one copy); a batch of them, about
    :data:`PIECE` bytes, is received on the event loop while the service decodes the
    batch before.
    """

    def __init__(self, receive: Receive, loop: asyncio.AbstractEventLoop, first: memoryview,
                 more: bool, length: int | None, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._receive = receive
        self._loop = loop
        self.length = length
        self._idle_timeout = idle_timeout
        self._view = first  # received, not handed out yet
        self._batch: deque[bytes] = deque()  # received after it, in order
        self._more = more  # the channel has more (written by the loop while it receives)
        self.received = len(first)
        self._expected = len(first)
        self._next: concurrent.futures.Future[list[bytes]] | None = None

    def expect(self, total: int) -> None:
        """The JSON part declares ``total`` bytes of tensor data."""
        self._expected = total

    def read(self, n: int, unit: int) -> memoryview:
        """At least ``unit`` and at most ``n`` bytes, a whole number of ``unit``s (an
        element's size); empty when the body ends first."""
        while len(self._view) < unit:
            if self._view:  # an element cut by the end of a message: join its bytes
                element = bytes(self._view)
                while len(element) < unit:
                    message = self._message()
                    if message is None:
                        return memoryview(b"")
                    cut = unit - len(element)
                    element += message[:cut]
                    self._view = memoryview(message)[cut:]
                return memoryview(element)
            message = self._message()
            if message is None:
                return memoryview(b"")
            self._view = memoryview(message)
        size = min(n, len(self._view))
        size -= size % unit
        out, self._view = self._view[:size], self._view[size:]
        return out

    def _message(self) -> bytes | None:
        """The next message of the body; None at its end (or past what is declared)."""
        while not self._batch:
            if self._next is None:
                if not self._more or self.received >= self._expected:
                    return None
                self._next = self._start()
            batch = self._next.result()
            self._next = None
            if not batch:
                return None
            self.received += sum(len(m) for m in batch)
            self._batch.extend(batch)
            if self._more and self.received < self._expected:
                self._next = self._start()  # read ahead while this batch is decoded
        return self._batch.popleft()

    def _start(self) -> concurrent.futures.Future[list[bytes]]:
        want = min(PIECE, self._expected - self.received)
        return asyncio.run_coroutine_threadsafe(self._gather(want), self._loop)

    async def _gather(self, want: int) -> list[bytes]:
        """Messages of at least ``want`` bytes in all (fewer at the end), on the loop."""
        batch: list[bytes] = []
        got = 0
        try:
            async with asyncio.timeout(None) as deadline:
                while got < want and self._more:
                    deadline.reschedule(self._loop.time() + self._idle_timeout)
                    data, self._more = await _message(self._receive)
                    if data:
                        batch.append(data)
                        got += len(data)
        except TimeoutError:
            raise InvalidArgument(
                f"the request body stalled: nothing arrived for {self._idle_timeout:g} s after "
                f"{self.received + got} bytes of tensor data") from None
        return batch

    def at_end(self) -> bool:
        """Whether the body holds nothing past what was read (reads what is left)."""
        if self._view or self._batch:
            return False
        if self.length is not None:
            return self.received == self.length
        while self._more:  # a chunked body: its end says
            if asyncio.run_coroutine_threadsafe(self._gather(1), self._loop).result():
                return False
        return True

    def close(self) -> None:
        """Stop a read ahead still under way (the request was refused early)."""
        if self._next is not None:
            self._next.cancel()
            self._next = None


async def read_blob(request: Request, limit: int, idle_timeout: float,
                    hold: Callable[[int], contextlib.AbstractContextManager[None]],
                    held: contextlib.ExitStack) -> bytes:
    """A whole body of at most ``limit`` bytes (an imported state blob), each part
    counted with ``hold`` (into ``held``, which the caller closes when done with it)
    before it is kept; a part that does not come within ``idle_timeout`` seconds, or a
    body past ``limit``, is refused."""
    length = _content_length(request)
    if length is not None and length > limit:
        raise ResourceExhausted(f"the body is {length} bytes; at most {limit} for this session")
    parts: list[bytes] = []
    total = 0
    more = True
    while more:
        try:
            data, more = await asyncio.wait_for(_message(request.receive), idle_timeout)
        except TimeoutError:
            raise InvalidArgument(f"the body sent nothing for {idle_timeout:g} s") from None
        total += len(data)
        if total > limit:
            raise ResourceExhausted(f"the body is over {limit} bytes, more than any state of "
                                    "this session needs")
        if data:
            held.enter_context(hold(len(data)))
            parts.append(data)
    return b"".join(parts)
