"""What a google.rpc.Status says beyond its code (the gRPC and Flight wires'): the
ErrorInfo's reason and metadata, and the RetryInfo's delay."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.rpc import error_details_pb2, status_pb2

DOMAIN = "adamserve"


@dataclass(frozen=True)
class Details:
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None  # seconds the server asks to wait before retrying


def details(status: status_pb2.Status | None) -> Details:
    """The server's ErrorInfo (its own domain's first) and RetryInfo in ``status``."""
    reason: str | None = None
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    ours = False
    for detail in status.details if status is not None else ():
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):  # False: another message type
            if not ours:
                reason, metadata = info.reason or None, dict(info.metadata)
                ours = info.domain == DOMAIN
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return Details(reason, metadata, retry_after)
