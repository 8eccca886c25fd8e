"""Who a gRPC call runs as: the key in its metadata, else (mutual TLS) the verified
client certificate's common name."""

from __future__ import annotations

import grpc

from adamserve import errors
from adamserve.service import Access, Caller
from adamserve.transports.tls import peer_common_name

Metadata = tuple[tuple[str, str | bytes], ...]

NO_KEY = "missing or wrong API key (token): send metadata 'authorization: Bearer <key>'"


def authorization(metadata: Metadata | None) -> str | bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value
    return None


def caller_of(access: Access, context: grpc.ServicerContext) -> Caller:
    """The caller of a call in its handler: its key's, else its certificate's."""
    caller = access.authenticate(authorization(context.invocation_metadata()))
    if caller is None and access.names_certificates:
        caller = access.certificate_caller(peer_common_name(context))
    if caller is None:
        raise errors.Unauthenticated(NO_KEY)
    return caller
