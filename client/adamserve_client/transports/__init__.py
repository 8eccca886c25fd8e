"""Transports: the session operations (:class:`Transport`, implemented once by
:class:`~adamserve_client.transports.client.Client`) over a narrow per-server seam
(:class:`~adamserve_client.transports.base.Wire`: ``unary`` and ``stream`` of v2
messages), with a gRPC and an HTTP wire; sharded sessions compose transports
(:class:`~adamserve_client.transports.sharded.ShardedTransport`).

``connect(url)`` picks the wire from the URL's scheme: ``grpc://host:port``,
``flight://host:port`` (Arrow Flight, the bulk data plane) or ``http://host:port``,
and over TLS ``grpcs://``, ``flight+tls://`` and ``https://`` (docs/security.md). The
wire modules import their libraries (grpcio, pyarrow, httpx) only when used.
"""

from __future__ import annotations

from adamserve_client.transports._codec import parse_url
from adamserve_client.transports._tls import PathLike, TlsOptions
from adamserve_client.transports.base import (
    CheckpointInfo,
    SessionInfo,
    SessionSpec,
    StepResult,
    TensorSpec,
    Transport,
    Wire,
    WireTensor,
)
from adamserve_client.transports.client import Client

__all__ = [
    "CheckpointInfo",
    "Client",
    "SessionInfo",
    "SessionSpec",
    "StepResult",
    "TensorSpec",
    "Transport",
    "Wire",
    "WireTensor",
    "connect",
]


def connect(url: str, token: str | None = None, timeout: float | None = None, *,
            retries: int = 3, tls_ca: PathLike | None = None, tls_cert: PathLike | None = None,
            tls_key: PathLike | None = None) -> Client:
    """The session operations on the adamserve server at ``url``.

    ``token``: the server's bearer token, if it has one. ``timeout``: seconds each
    call may take (None: no limit). ``retries``: calls made in all while the server
    is unavailable (exponential backoff between them). For a TLS URL, PEM files:
    ``tls_ca`` the CA to trust (else the default trust store), ``tls_cert`` and
    ``tls_key`` a client certificate (mutual TLS); each not given is read from
    ``ADAMSERVE_TLS_CA`` / ``ADAMSERVE_TLS_CERT`` / ``ADAMSERVE_TLS_KEY`` when set.
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in ("flight", "flight+tls"):
        scheme = parse_url(url).scheme
    given = (tls_ca, tls_cert, tls_key) != (None, None, None)
    tls = TlsOptions.load(tls_ca, tls_cert, tls_key) if given else None
    try:
        if scheme in ("flight", "flight+tls"):
            from adamserve_client.transports.flight import FlightTransport

            return FlightTransport(url, token, timeout, retries=retries, tls=tls)
        if scheme in ("grpc", "grpcs"):
            from adamserve_client.transports.grpc import GrpcTransport

            return GrpcTransport(url, token, timeout, retries=retries, tls=tls)
        from adamserve_client.transports.http import HttpTransport
    except ModuleNotFoundError as exc:
        if exc.name not in _WIRE_LIBRARIES:
            raise
        extra = "client,flight" if scheme.startswith("flight") else "client"
        raise ImportError(f"adamserve_client: {scheme}:// URLs need the {exc.name} package, "
                          f"which is not installed: pip install 'adamserve[{extra}]'") from None
    return HttpTransport(url, token, timeout, retries=retries, tls=tls)


# The packages each wire needs beyond the core install (the `client` extra brings them).
_WIRE_LIBRARIES = frozenset({"grpc", "httpx", "httpcore", "h11", "anyio", "pyarrow"})
