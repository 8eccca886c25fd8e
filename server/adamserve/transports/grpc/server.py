"""Build the gRPC server: the OptimizerService, health, reflection and the bearer token."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from adamserve import errors, metrics
from adamserve.service import OptimizerService
from adamserve.transports.grpc.servicer import (
    MAX_RECEIVE_BYTES,
    METHOD_KINDS,
    SERVICE_NAME,
    TRANSPORT,
    add_to_server,
    error_status,
)
from adamserve_proto import rpc

log = logging.getLogger("adamserve.transports.grpc")

Metadata = tuple[tuple[str, str | bytes], ...]

# grpc.reflection.v1 is v1alpha under another package name, message for message (the
# protocol was promoted as it was); grpcio-reflection serves v1alpha only.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME
# Services that answer without a token: load balancers and grpcurl need them.
OPEN_SERVICES = (health.SERVICE_NAME, REFLECTION_V1ALPHA, REFLECTION_V1)


def _add_reflection_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool (v1alpha's file with
    its package renamed), so reflection describes the v1 service as well."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    v1 = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1)
    old, new = f".{v1.package}.", ".grpc.reflection.v1."
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    v1.ClearField("options")
    for message in v1.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for service in v1.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(v1)


def _enable_reflection(server: grpc.Server, names: tuple[str, ...]) -> None:
    """Server reflection v1alpha and v1 (one servicer answers both)."""
    _add_reflection_v1_descriptor()
    servicer = reflection.ReflectionServicer((*names, REFLECTION_V1ALPHA, REFLECTION_V1))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
        for name in (REFLECTION_V1ALPHA, REFLECTION_V1)))


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without metadata ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    The token is compared in constant time. Health and reflection stay open.
    """

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def _authorized(self, metadata: Metadata | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            raw = value.encode() if isinstance(value, str) else bytes(value)
            scheme, _, credential = raw.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(),
                                                                   self._expected):
                return True
        return False

    def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         grpc.RpcMethodHandler[Any, Any] | None],
            handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        service = method.lstrip("/").partition("/")[0]
        if service in OPEN_SERVICES or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without a token
        name = method.rpartition("/")[2]

        def deny(request: object, context: grpc.ServicerContext) -> None:
            metrics.REQUESTS.labels(TRANSPORT, name, "UNAUTHENTICATED").inc()
            context.abort_with_status(error_status(errors.Unauthenticated(
                "missing or wrong token: send metadata 'authorization: Bearer <token>'")))

        factory = METHOD_KINDS[rpc.kind(handler.request_streaming, handler.response_streaming)]
        return factory(deny, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def _address(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a host name, or already bracketed
    return f"{host}:{port}"


def _serve_when_ready(service: OptimizerService, server: grpc.Server,
                      health_servicer: health.HealthServicer) -> None:
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
    ``service.ready``, then SERVING, for "" and "adamserve_proto.v2.OptimizerService")
    and server reflection (v1 and v1alpha) need none. Messages up to 64 MiB are accepted; the server
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
    _enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
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
