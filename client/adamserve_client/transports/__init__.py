"""Transports: one narrow seam (:class:`Transport`), two wires with the same method names.

``connect(url)`` picks the wire from the URL's scheme: ``grpc://host:port`` or
``http://host:port`` / ``https://host:port``. The transport modules import their
wire libraries (grpcio, httpx) only when used.
"""

from __future__ import annotations

from adamserve_client.transports._codec import parse_url
from adamserve_client.transports.base import (
    CheckpointInfo,
    SessionInfo,
    SessionSpec,
    StepResult,
    TensorSpec,
    Transport,
    WireTensor,
)

__all__ = [
    "CheckpointInfo",
    "SessionInfo",
    "SessionSpec",
    "StepResult",
    "TensorSpec",
    "Transport",
    "WireTensor",
    "connect",
]


def connect(url: str, token: str | None = None, timeout: float | None = None, *,
            retries: int = 3) -> Transport:
    """A transport to the adamserve server at ``url``.

    ``token``: the server's bearer token, if it has one. ``timeout``: seconds each
    call may take (None: no limit). ``retries``: calls made in all while the server
    is unavailable (exponential backoff between them).
    """
    scheme = parse_url(url).scheme
    try:
        if scheme == "grpc":
            from adamserve_client.transports.grpc import GrpcTransport

            return GrpcTransport(url, token, timeout, retries=retries)
        from adamserve_client.transports.http import HttpTransport
    except ModuleNotFoundError as exc:
        if exc.name not in _WIRE_LIBRARIES:
            raise
        raise ImportError(f"adamserve_client: {scheme}:// URLs need the {exc.name} package, "
                          "which is not installed: pip install 'adamserve[client]'") from None
    return HttpTransport(url, token, timeout, retries=retries)


# The packages each wire needs beyond the core install (the `client` extra brings them).
_WIRE_LIBRARIES = frozenset({"grpc", "httpx", "httpcore", "h11", "anyio"})
