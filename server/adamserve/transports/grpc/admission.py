"""Who a gRPC call runs as, decided before it may hold one of the server's threads.

gRPC runs server interceptors on the thread that accepts calls, before a handler
is given a pool thread: :class:`AdmissionInterceptor` refuses a call without a
known key there (UNAUTHENTICATED), spends the tenant's request rate (RATE_LIMITED),
and wraps the handler so that it counts as one of its tenant's calls in flight
while it runs (TOO_MANY_STREAMS past the quota). The health service stays open
(load balancers probe it without a key): Check is answered at once and counted
nowhere, so probes always get through; Watch streams, which hold a thread, are
counted together under a small cap. Server reflection needs a key when the server
has keys.

Under mutual TLS with ``[[certificates]]`` in the auth file, a call may come with no
key: its certificate (verified in the handshake, so only certificate holders get
this far) names the caller, read from the call's auth context in the handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from adamserve import errors, metrics
from adamserve.service import Access, Caller
from adamserve.transports.grpc.identity import NO_KEY, authorization, caller_of
from adamserve.transports.grpc.servicer import METHOD_KINDS, TRANSPORT, error_status
from adamserve_proto import rpc

HEALTH = "grpc.health.v1.Health"
REFLECTION = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

_KINDS = {(False, False): "unary_unary", (False, True): "unary_stream",
          (True, False): "stream_unary", (True, True): "stream_stream"}

class AdmissionInterceptor(grpc.ServerInterceptor):
    def __init__(self, access: Access) -> None:
        self.access = access

    def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         grpc.RpcMethodHandler[Any, Any] | None],
            details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED, with or without a key
        service = details.method.lstrip("/").partition("/")[0]
        if service == HEALTH and not handler.response_streaming:
            return handler  # Check: answered at once, holds nothing; probes must get through
        if service == HEALTH or (service in REFLECTION and not self.access.required):
            return self._counted(handler, details, None, open_call=True)
        caller = self.access.authenticate(authorization(details.invocation_metadata))
        if caller is None and not self.access.names_certificates:
            return _deny(handler, details, errors.Unauthenticated(NO_KEY))
        if caller is not None:
            try:
                self.access.admit(caller)
            except errors.TooManyRequests as exc:
                return _deny(handler, details, exc)
        return self._counted(handler, details, caller)

    def _counted(self, handler: grpc.RpcMethodHandler[Any, Any],
                 details: grpc.HandlerCallDetails, caller: Caller | None,
                 open_call: bool = False) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` counted as one call in flight of its caller while it runs."""
        access = self.access
        kind = (handler.request_streaming, handler.response_streaming)
        behavior = getattr(handler, _KINDS[kind])

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            who = caller
            try:
                if not open_call and who is None:  # a certificate's call: named only now
                    who = caller_of(access, context)
                    access.admit(who)
                access.enter(who)
            except errors.ServiceError as exc:
                status = error_status(exc)
                metrics.REQUESTS.labels(TRANSPORT, _name(details), status.code.name).inc()
                context.abort_with_status(status)
            if not context.add_callback(lambda: access.leave(who)):
                access.leave(who)  # the call ended already
            return behavior(request, context)

        return METHOD_KINDS[rpc.kind(*kind)](run, request_deserializer=handler.request_deserializer,
                                             response_serializer=handler.response_serializer)


def _name(details: grpc.HandlerCallDetails) -> str:
    return details.method.rpartition("/")[2]


def _deny(handler: grpc.RpcMethodHandler[Any, Any], details: grpc.HandlerCallDetails,
          exc: errors.ServiceError) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that answers ``exc`` at once (it holds a pool thread only for that)."""
    status = error_status(exc)

    def deny(request: object, context: grpc.ServicerContext) -> None:
        metrics.REQUESTS.labels(TRANSPORT, _name(details), status.code.name).inc()
        context.abort_with_status(status)

    factory = METHOD_KINDS[rpc.kind(handler.request_streaming, handler.response_streaming)]
    return factory(deny, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
