"""Build the gRPC server: the OptimizerService, health, reflection, and admission (keys,
tenants' quotas: :mod:`.admission`), with bounded threads, streams and connections."""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from adamserve.service import Access, OptimizerService
from adamserve.transports.grpc.admission import AdmissionInterceptor
from adamserve.transports.grpc.servicer import (
    MAX_RECEIVE_BYTES,
    SERVICE_NAME,
    add_to_server,
)
from adamserve.transports.tls import TlsFiles, grpc_credentials

log = logging.getLogger("adamserve.transports.grpc")

Metadata = tuple[tuple[str, str | bytes], ...]

# grpc.reflection.v1 is v1alpha under another package name, message for message (the
# protocol was promoted as it was); grpcio-reflection serves v1alpha only.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME


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


# Bounds on what one peer may hold (docs/security.md).
MAX_STREAMS_PER_CONNECTION = 128
IDLE_CONNECTION_MS = 5 * 60_000
KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


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
                      token: str | None = None, max_workers: int = 1024,
                      tls: TlsFiles | None = None,
                      access: Access | None = None) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``service``; return it (started) and the port it bound.

    ``port`` 0 picks a free port. ``access``: the keys and tenants (``token`` alone: one
    key for the default tenant; neither: no authentication). With keys, every call but
    the health service's (NOT_SERVING until ``service.ready``, then SERVING, for "" and
    "adamserve_proto.v2.OptimizerService") must carry ``authorization: Bearer <key>``,
    server reflection (v1 and v1alpha) included. Messages up to 64 MiB are accepted; the server
    sends at most 4 MiB per message. With ``tls`` the port speaks only TLS (mutual TLS
    when it has a client CA). Stop it with ``server.stop(grace)``.
    """
    access = access or Access.single(token)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="adamserve-grpc"),
        interceptors=[AdmissionInterceptor(access)],
        # past the pool's threads a call is refused (RESOURCE_EXHAUSTED), not queued
        maximum_concurrent_rpcs=max_workers,
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_RECEIVE_BYTES),
            ("grpc.so_reuseport", 0),
            # one connection may hold this many calls at once (HTTP/2 streams)
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            # connections with no call for this long are closed; silent peers are found
            # by keepalive pings and dropped
            ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    add_to_server(service, server, access)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
    address = _address(host, port)
    try:
        bound = (server.add_secure_port(address, grpc_credentials(tls)) if tls is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise OSError(f"gRPC: cannot listen on {address} ({exc})") from None
    if not bound:
        raise OSError(f"gRPC: cannot listen on {address}")
    server.start()
    _serve_when_ready(service, server, health_servicer)
    log.info("gRPC listening on %s%s%s", _address(host, bound),
             "" if tls is None else " (mutual TLS)" if tls.mutual else " (TLS)",
             " (keys required)" if access.required else "")
    return server, int(bound)
