"""The FastAPI app factory, its gate (token, body caps, request metrics, the hot routes'
direct dispatch) and uvicorn runners."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic.json_schema import models_json_schema
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import adamserve
from adamserve import metrics
from adamserve.errors import ServiceError
from adamserve.service import Access, Caller, OptimizerService
from adamserve.transports.http import body, connections, errors, routes, status
from adamserve.transports.http.binary import (
    HEADER_LENGTH,
    OCTET_STREAM,
    TRITON_HEADER_LENGTH,
    header_length,
)
from adamserve.transports.tls import TlsFiles, uvicorn_options

log = logging.getLogger("adamserve.http")

DEFAULT_MAX_BODY_BYTES = 2 << 30  # binary bodies (application/octet-stream)
DEFAULT_MAX_JSON_BYTES = 64 << 20  # JSON bodies and the JSON part of binary ones

# Never behind the token: probes, the API description and its pages, the status page's
# shell and files (its data is behind the token).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", *status.OPEN_PATHS})


# Server-wide numbers (every tenant's sessions and bytes): for admin keys only.
ADMIN_PATH = "/metrics"

_BINARY_HEADERS = frozenset({HEADER_LENGTH.lower().encode(), TRITON_HEADER_LENGTH.lower().encode()})


class _Gate:
    """Pure ASGI middleware: bearer token, body size caps, request counter, and the
    direct dispatch of the hot routes.

    Runs before routing and body parsing, so a request without the token is
    refused before its body is read, and an oversized body is cut off while it
    streams in (Content-Length is checked first; chunked bodies are counted). A
    request to a route that reads a body (``routes.BODY_ROUTES``) is checked, before a
    byte of it is read, against the caller's role and sessions (a session it does not
    have answers 404 at once), and its body takes its share of the server's
    :class:`~.body.BodyBudget` before it is read (429 when there is no room).

    The routes named in ``routes.DIRECT`` (steps and pushes) are served here: their
    endpoint is called as FastAPI would call it, and its errors answered by the same
    handlers, without FastAPI's routing, dependency solving and inner middleware
    (about 0.15 ms a request, most of a small step's HTTP overhead). FastAPI still
    documents them and answers whatever does not match them (another method, say).
    """

    def __init__(self, app: ASGIApp, access: Access, max_body_bytes: int,
                 max_json_bytes: int, direct: tuple[APIRoute, ...] = (),
                 bodies: tuple[APIRoute, ...] = (),
                 budget: body.BodyBudget | None = None,
                 idle_timeout: float = body.IDLE_TIMEOUT) -> None:
        self.app = app
        self.access = access
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = max_json_bytes
        self.direct = direct
        # the routes that read a body, the hot ones first
        self.bodies = direct + tuple(r for r in bodies if r not in direct)
        self.budget = budget or body.BodyBudget(body.DEFAULT_BUFFERED_BYTES)
        self.idle_timeout = idle_timeout  # a body that sends nothing this long is refused

    def _match(self, scope: Scope) -> tuple[APIRoute, Scope] | None:
        """The route that reads a body this request is for, and its path parameters."""
        for route in self.bodies:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child
        return None

    def _share(self, scope: Scope, length: int | None) -> body.Share:
        """What the request's body will hold of the budget (its headers say which kind
        of body it is; a bad binary header length is refused here, 400)."""
        headers = Headers(scope=scope)
        json_part = header_length(headers)
        raw = json_part is None and headers.get("content-type", "").split(";")[
            0].strip().lower() == OCTET_STREAM
        return body.Share(self.budget, length, json_part, raw)

    async def _serve_direct(self, scope: Scope, route: APIRoute, child: Scope,
                            receive: Receive, send: Send) -> None:
        """Serve the request of direct route ``route`` (``child``: its path parameters)."""
        scope.update(child)
        scope["route"] = route
        request = Request(scope, receive)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            response = await route.endpoint(request=request, service=scope["app"].state.service,
                                            caller=scope["state"]["caller"],
                                            **scope["path_params"])
        except Exception as exc:
            response = await errors.handle(request, exc)
        try:
            await response(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise
            await (await errors.handle(request, exc))(scope, receive, send)

    def _caller(self, scope: Scope) -> Caller | None:
        """The caller the request's ``Authorization`` names (None: no known key)."""
        for key, value in scope["headers"]:
            if key == b"authorization":
                return self.access.authenticate(bytes(value))
        return self.access.authenticate(None)

    def _limit(self, scope: Scope) -> tuple[int, int | None]:
        """The body cap for this request and its declared Content-Length.

        Binary bodies (application/octet-stream, or any body with a binary header
        length) get ``max_body_bytes``; everything else ``max_json_bytes``.
        """
        length: int | None = None
        cap = self.max_json_bytes
        for key, value in scope["headers"]:
            if key == b"content-length":
                text = bytes(value).strip()
                length = int(text) if text.isdigit() else None
            elif key in _BINARY_HEADERS or (key == b"content-type" and bytes(value).split(
                    b";")[0].strip().lower() == OCTET_STREAM.encode()):
                cap = self.max_body_bytes
        return cap, length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        replied = False  # the gate answered itself; drop whatever the app sends

        async def send_app(message: Message) -> None:
            nonlocal status
            if replied:
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        async def reply(code: int, message: str, headers: dict[str, str] | None = None) -> None:
            nonlocal status, replied
            status, replied = code, True
            await errors.error_response(code, message, None, headers)(scope, receive, send)

        admitted: Caller | None = None
        share: body.Share | None = None
        try:
            if scope["path"] not in OPEN_PATHS:
                caller = self._caller(scope)
                if caller is None:
                    await reply(401, "missing or wrong API key (token): send "
                                     "Authorization: Bearer <key>",
                                {"WWW-Authenticate": "Bearer"})
                    return
                try:
                    self.access.admit(caller)
                    self.access.enter(caller)
                except ServiceError as exc:
                    status, replied = 429, True
                    await errors.answer(exc)(scope, receive, send)
                    return
                admitted = caller
                scope.setdefault("state", {})["caller"] = caller
                if scope["path"] == ADMIN_PATH and not caller.admin:
                    # server-wide numbers: every tenant's sessions and bytes
                    await reply(403, f"{ADMIN_PATH} needs an admin key: its numbers are "
                                     "every tenant's")
                    return
            cap, length = self._limit(scope)
            if length is not None and length > cap:
                await reply(413, _too_large(length, cap))
                return
            matched = self._match(scope)
            if matched is not None:
                target, child = matched
                try:  # before a byte of the body is read
                    scope["app"].state.service.check_request(
                        child["path_params"].get("session_id"),
                        write=routes.BODY_ROUTES[target.name], caller=scope["state"]["caller"])
                    share = self._share(scope, length)
                    await share.start()  # may wait for room, briefly
                except ServiceError as exc:
                    status, replied = errors.status_of(exc), True
                    await errors.answer(exc)(scope, receive, send)
                    return
            received = 0
            started = False
            ended = share is None  # the body is in (what is not read is not timed)

            async def receive_capped() -> Message:
                nonlocal received, started, status, replied, ended
                if ended:
                    message = await receive()
                else:
                    try:
                        async with asyncio.timeout(self.idle_timeout):
                            message = await receive()
                    except TimeoutError:
                        if not replied and not started:
                            await reply(400, f"the request body stalled: nothing arrived "
                                             f"for {self.idle_timeout:g} s after {received} "
                                             "bytes")
                        return {"type": "http.disconnect"}
                if message["type"] == "http.request":
                    ended = not message.get("more_body")
                    received += len(message.get("body", b""))
                    if received > cap:
                        if not replied and not started:
                            await reply(413, _too_large(received, cap))
                        return {"type": "http.disconnect"}
                    if share is not None:
                        try:
                            await share.received(received, bool(message.get("more_body")))
                        except ServiceError as exc:  # no room in the budget
                            if not replied and not started:
                                status, replied = errors.status_of(exc), True
                                await errors.answer(exc)(scope, receive, send)
                            return {"type": "http.disconnect"}
                return message

            async def send_tracked(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                await send_app(message)

            if matched is not None and matched[0] in self.direct:
                await self._serve_direct(scope, *matched, receive_capped, send_tracked)
            else:
                await self.app(scope, receive_capped, send_tracked)
        except Exception:
            if not replied:
                raise
            log.debug("request cut off by the gate", exc_info=True)
        finally:
            if share is not None:
                share.release()
            if admitted is not None:
                self.access.leave(admitted)
            route = scope.get("route")
            name = (getattr(route, "name", None)
                    or getattr(scope.get("endpoint"), "__name__", None) or "unmatched")
            metrics.REQUESTS.labels("http", name, str(status)).inc()


def _too_large(size: int, cap: int) -> str:
    return (f"request body of at least {size} bytes is over the limit of {cap} bytes "
            "(JSON bodies have a smaller limit than application/octet-stream ones)")


class _App(FastAPI):
    """FastAPI with the raw-body request models added to the OpenAPI components, under
    the gate: outside FastAPI's own middleware, so that the direct routes skip it too."""

    gate: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return self.gate(stack) if self.gate is not None else stack

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        schema = super().openapi()
        _, defs = models_json_schema(
            [(m, "validation") for m in routes.RAW_BODY_MODELS],
            ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        self.openapi_schema = schema
        return schema


# Workers of a synchronous session wait in the thread pool for their round: room for
# many more than anyio's default 40 threads (idle waiting threads cost little).
THREADS = 1024


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield


def create_app(service: OptimizerService, token: str | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
               body_idle_timeout: float = body.IDLE_TIMEOUT,
               access: Access | None = None,
               max_buffered_bytes: int = body.DEFAULT_BUFFERED_BYTES) -> FastAPI:
    """The HTTP API over ``service``.

    ``access``: the keys and tenants (``token`` alone: one key for the default
    tenant; neither: no authentication). With keys, every route but /healthz, /readyz,
    the API docs and the status page's shell (:mod:`.status`; its data is /v2's) needs
    ``Authorization: Bearer <key>``. ``max_body_bytes`` caps binary
    (application/octet-stream) bodies, ``max_json_bytes`` every other body and the
    JSON part of binary ones; over either is a 413. A body that sends nothing for
    ``body_idle_timeout`` seconds is refused (400). ``max_buffered_bytes``: what the
    bodies of all requests together may hold at once (:class:`~.body.BodyBudget`; a
    JSON body counts :data:`~.body.JSON_EXPANSION` times its bytes); past it, 429.
    """
    app = _App(
        # the server's metrics are Prometheus' (/metrics): FastAPI's OpenTelemetry hooks
        # off, so no request pays for asking whether they are on
        telemetry={"tracing": False, "metrics": False, "logs": False},
        lifespan=_lifespan,
        title="adamserve",
        version=adamserve.__version__,
        description="Optimizer-as-a-service: the Adam family on a stateful server.",
        separate_input_output_schemas=False,
        # /docs and /redoc are status.py's: their scripts served here, not from a CDN
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.max_json_bytes = max_json_bytes
    app.state.body_idle_timeout = body_idle_timeout
    app.state.body_budget = body.BodyBudget(max_buffered_bytes)
    errors.install(app)
    access = access or Access.single(token)
    guard = [Security(HTTPBearer(auto_error=False))] if access.required else []
    app.include_router(routes.router, dependencies=guard)  # documents the scheme
    app.include_router(routes.open_router)
    app.include_router(status.router, dependencies=guard)
    app.include_router(status.open_router)
    direct = tuple(r for r in routes.router.routes
                   if isinstance(r, APIRoute) and r.name in routes.DIRECT)
    bodies = tuple(r for r in routes.router.routes
                   if isinstance(r, APIRoute) and r.name in routes.BODY_ROUTES)
    app.gate = functools.partial(_Gate, access=access, max_body_bytes=max_body_bytes,
                                 max_json_bytes=max_json_bytes, direct=direct, bodies=bodies,
                                 budget=app.state.body_budget, idle_timeout=body_idle_timeout)
    return app


# -- uvicorn ---------------------------------------------------------------------


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


KEEPALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection is kept (uvicorn's default)


def build_http_server(app: ASGIApp, host: str, port: int, *,
                      header_timeout: float = connections.HEADER_TIMEOUT,
                      keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                      **config: Any) -> uvicorn.Server:
    """A uvicorn server on uvloop + httptools (when installed); ``config`` overrides.

    Every connection must complete each request's headers within ``header_timeout``
    seconds of its first byte (or of the connection: :mod:`.connections`); one idle
    between requests is closed after ``keepalive_timeout`` seconds. Logging is left to
    the caller (``log_config=None``): the CLI configures it.
    """
    options: dict[str, Any] = {
        "loop": "uvloop" if _has("uvloop") else "asyncio",
        "http": "httptools" if _has("httptools") else "h11",
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": 10,
        "timeout_keep_alive": keepalive_timeout,
    }
    options.update(config)
    if isinstance(options["http"], str):
        options["http"] = connections.guarded(options["http"], header_timeout)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))


def serve_http(app: ASGIApp, host: str, port: int, **config: Any) -> None:
    """Run the HTTP server in this thread until SIGINT/SIGTERM (blocking)."""
    build_http_server(app, host, port, **config).run()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HttpServerThread:
    """uvicorn in a background thread: ``start()`` returns the bound port (port 0 works).

    With ``tls`` it serves HTTPS only (asking for a client certificate when ``tls`` has a
    client CA). Usable as a context manager. Signals stay with the main thread.
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *,
                 tls: TlsFiles | None = None, **config: Any) -> None:
        self.host = host
        self.tls = tls
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        if tls is not None:
            config = {**uvicorn_options(tls), **config}
        self.server = build_http_server(app, host, self.port, **config)
        self._thread = threading.Thread(target=self._run, name=f"http:{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # SystemExit from a failed startup included
            self._error = exc

    def start(self, timeout: float = 30.0) -> int:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"HTTP server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"HTTP server did not start within {timeout} s")
            time.sleep(0.005)
        return self.port

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> HttpServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
