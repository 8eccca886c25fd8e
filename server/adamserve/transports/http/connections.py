"""Connections that cannot be held open for free: a deadline on every request's headers.

uvicorn times a connection out only after a response (``timeout_keep_alive``): a
connection that sends nothing, or half a header line, or a header byte a minute, is
kept forever, and httptools puts no bound on the size of the headers either. So the
server's protocol is uvicorn's wrapped in :class:`Guarded`: from the moment a
connection opens, and again from the first byte of each next request, its headers
must be complete within ``header_timeout`` seconds and :data:`MAX_HEADER_BYTES`;
else the connection is answered 408 (or 431) and closed. What is left of a body the
server answered before reading it (a 404, say) must arrive within that time too.
Bodies being read have their own idle timeout (:mod:`.body`), idle keep-alive
connections uvicorn's (``timeout_keep_alive``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import TYPE_CHECKING, Any, ClassVar, cast

from uvicorn.config import Config
from uvicorn.server import ServerState

if TYPE_CHECKING:  # httptools is optional (h11 otherwise): imported when chosen
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("adamserve.http")

HEADER_TIMEOUT = 20.0  # seconds from a request's first byte (or the connection) to its headers
MAX_HEADER_BYTES = 64 << 10  # request line and headers (h11's own limit is 16 KiB)

_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
              b"connection: close\r\n\r\n")


class Guarded(asyncio.Protocol):
    """uvicorn's HTTP protocol (``inner``) with a deadline on each request's headers."""

    inner_class: ClassVar[type[HttpToolsProtocol] | type[H11Protocol]]
    # httptools starts a request's scope at its first byte; h11 (which bounds the headers
    # it buffers itself) only once they are complete
    begins_early: ClassVar[bool]
    header_timeout: ClassVar[float]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.inner = self.inner_class(config=config, server_state=server_state,
                                      app_state=app_state, _loop=_loop)
        self.loop = self.inner.loop
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending = 0  # bytes of the next request's headers received so far

    def _idle(self) -> bool:
        """No request under way: none yet, or the last one answered."""
        cycle = self.inner.cycle
        return cycle is None or cycle.response_complete

    def _headers_begun(self) -> bool:
        """Whether a request has begun whose headers are not complete."""
        if not self.begins_early:
            return self._idle()
        scope, cycle = self.inner.scope, self.inner.cycle
        return scope is not None and (cycle is None or cycle.scope is not scope)

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, answer: bytes, why: str) -> None:
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._pending:  # a request began: say why it ends (an idle one just closes)
            transport.write(answer)
        log.debug("closing an HTTP connection from %s: %s", self.inner.client, why)
        transport.close()

    def _expired(self) -> None:
        self._timer = None
        if self._headers_begun() or self._idle():
            self._refuse(_TIMED_OUT, f"no complete request headers within "
                                     f"{self.header_timeout:g} s")

    # -- asyncio.Protocol, forwarded ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's too, not a subclass
        self.inner.connection_made(self.transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.inner.cycle
        idle = self._idle()
        self.inner.data_received(data)
        if self.inner.cycle is not before:  # a request's headers are complete
            self._pending = 0
            self._disarm()
        elif self._headers_begun():  # uvicorn has stopped its keep-alive timer
            self._pending += len(data)
            self._arm()
            if self._pending > MAX_HEADER_BYTES:
                self._refuse(_TOO_LARGE, f"request headers over {MAX_HEADER_BYTES} bytes")
        elif idle:  # the rest of a body answered before it was read: as long, at most
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def guarded(http: str, header_timeout: float = HEADER_TIMEOUT) -> type[Guarded]:
    """The protocol class uvicorn serves with: ``http`` ("httptools" or "h11") guarded."""
    module, name = (("httptools_impl", "HttpToolsProtocol") if http == "httptools"
                    else ("h11_impl", "H11Protocol"))
    inner = getattr(importlib.import_module(f"uvicorn.protocols.http.{module}"), name)
    return type(f"Guarded{inner.__name__}", (Guarded,),
                {"inner_class": inner, "begins_early": http == "httptools",
                 "header_timeout": header_timeout})
