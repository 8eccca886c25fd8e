# grpcio ships no type information; its names are Any here (types-grpcio would type them).
# mypy: disable-error-code="import-untyped"
"""Build the gRPC server: the Optimizer service, health, reflection and the bearer token."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adamserve import metrics
from adamserve.service import OptimizerService
from adamserve.transports.grpc.servicer import (
    MAX_RECEIVE_BYTES,
    METHOD_KINDS,
    SERVICE_NAME,
    TRANSPORT,
    add_to_server,
)

log = logging.getLogger("adamserve.transports.grpc")

# Services that answer without a token: load balancers and grpcurl need them.
OPEN_SERVICES = ("grpc.health.v1.Health", reflection.SERVICE_NAME,
                 "grpc.reflection.v1.ServerReflection")


class BearerTokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc, unused-ignore]
    """Refuse calls without metadata ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    The token is compared in constant time. Health and reflection stay open.
    """

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            raw = value.encode() if isinstance(value, str) else bytes(value)
            scheme, _, credential = raw.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(),
                                                                   self._expected):
                return True
        return False

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        service = method.lstrip("/").partition("/")[0]
        if service in OPEN_SERVICES or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without a token
        name = method.rpartition("/")[2]

        def deny(request: Any, context: Any) -> None:
            metrics.REQUESTS.labels(TRANSPORT, name, "UNAUTHENTICATED").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong token: send metadata 'authorization: Bearer <token>'")

        factory = METHOD_KINDS[(handler.request_streaming, handler.response_streaming)]
        return factory(deny, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def _address(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a host name, or already bracketed
    return f"{host}:{port}"


def _serve_when_ready(service: OptimizerService, server: Any,
                      health_servicer: Any) -> None:
    """Report SERVING once ``service.ready``; stop watching when the server stops."""
    serving = health_pb2.HealthCheckResponse.SERVING

    def mark() -> None:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, serving)

    if service.ready:
        mark()
        return

    def watch() -> None:
        # wait_for_termination returns True when it timed out, i.e. the server still runs.
        while not service.ready:
            if not server.wait_for_termination(timeout=0.05):
                return
        mark()

    threading.Thread(target=watch, name="adamserve-grpc-health", daemon=True).start()


def build_grpc_server(service: OptimizerService, host: str = "127.0.0.1", port: int = 0,
                      token: str | None = None, max_workers: int = 1024) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``service``; return it (started) and the port it bound.

    ``port`` 0 picks a free port. With ``token``, every Optimizer call must carry
    ``authorization: Bearer <token>``; the health service (NOT_SERVING until
    ``service.ready``, then SERVING, for "" and "adamserve.v1.Optimizer") and
    server reflection need none. Messages up to 64 MiB are accepted; the server
    sends at most 4 MiB per message. Stop it with ``server.stop(grace)``.
    """
    if token is not None and not token:
        raise ValueError("token: expected a non-empty string, or None for no authentication")
    interceptors: list[grpc.ServerInterceptor] = [BearerTokenInterceptor(token)] if token else []
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="adamserve-grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_RECEIVE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_to_server(service, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    address = _address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"gRPC: cannot listen on {address} ({exc})") from None
    if not bound:
        raise OSError(f"gRPC: cannot listen on {address}")
    server.start()
    _serve_when_ready(service, server, health_servicer)
    log.info("gRPC listening on %s%s", _address(host, bound),
             " (bearer token required)" if token else "")
    return server, int(bound)
