"""Domain errors. Each transport maps them to its own status codes, one table each.

They sit outside the layers so every layer may raise them. Besides its status
(``code``) every error carries a stable machine-readable ``reason`` (UPPER_SNAKE_CASE,
as google.rpc.ErrorInfo's): the class's default, or a more specific one from
:data:`REASONS` given where it is raised, plus optional string ``metadata`` (the
session id, the step...). A client branches on the reason, never on the message.
"""

from __future__ import annotations

from collections.abc import Mapping

from adamserve_proto.text import shown as shown  # the one way messages echo input

# Every reason the server gives, and what it means. Stable: clients match on them.
REASONS: dict[str, str] = {
    "INTERNAL": "an unexpected server error (the message is generic)",
    "INVALID_ARGUMENT": "the request is malformed or does not fit the session",
    "UNARY_TOO_LARGE": "the session's parameters do not fit one StepUnary reply: use the "
                       "Step stream",
    "SESSION_NOT_FOUND": "no such session (or it was deleted or replaced meanwhile)",
    "CHECKPOINT_NOT_FOUND": "the session has no complete checkpoint of that step",
    "SESSION_EXISTS": "a session with that id exists already",
    "FAILED_PRECONDITION": "the session's state does not allow the request now",
    "STALE_PUSH": "a push computed from a step the session has moved past, or too stale",
    "PUSH_AHEAD": "a push computed from a step the session has not reached",
    "ROUND_OPEN": "a change refused while a round of pushes is open",
    "STEP_STAGED": "a change refused while a staged step waits for its commit",
    "NO_STAGED_STEP": "a commit for a step (or round) that is neither staged nor the last "
                      "one committed",
    "COMMIT_OUT_OF_ORDER": "LAMB's second commit (param_sumsq) before its first",
    "NOT_STREAMABLE": "a step sent with apply_as_received to a session that cannot apply "
                      "gradients as they arrive (several workers, a shard, LAMB or "
                      "whole-gradient checks): send it without",
    "DUPLICATE_WORKER_PUSH": "a worker pushed twice for one step with other sequences",
    "LAYOUT_CHANGED": "the session's tensors changed while the request arrived",
    "WORKERS_CHANGED": "the session's workers changed while a row-sparse push arrived",
    "CHECKPOINTS_DISABLED": "the server has no data directory",
    "QUOTA_EXCEEDED": "a server limit on memory, waiting requests or workers",
    "DEVICE_OUT_OF_MEMORY": "the device could not allocate what the request needs",
    "ROUND_ABORTED": "a synchronous round failed: nothing was applied; push again",
    "WAIT_TIMEOUT": "a wait for a step ran out of time; nothing changed",
    "UNAUTHENTICATED": "a missing or wrong bearer token (API key)",
    "PERMISSION_DENIED": "the caller's role does not allow the request (read-only keys "
                         "cannot change sessions; only admin keys may act server-wide)",
    "RATE_LIMITED": "the tenant's requests-per-second quota is spent: retry after the "
                    "hint (RetryInfo / Retry-After)",
    "TOO_MANY_STREAMS": "the tenant (or the server) has as many calls open as it may: "
                        "retry after the hint once one ends",
    "DATA_DIR_UNAVAILABLE": "the data directory cannot be written or read (permissions, a "
                            "full or failing disk); nothing changed",
    "SHARED_MEMORY_DISABLED": "a shared-memory request to a server started without "
                              "--allow-shared-memory",
    "SHARED_MEMORY_NOT_FOUND": "no shared-memory region of that name is registered (by this "
                               "tenant), or, registering, no such object on the server's "
                               "host",
    "SHARED_MEMORY_EXISTS": "a shared-memory region of that name is registered already",
    "SHARED_MEMORY_OUT_OF_RANGE": "a place that does not lie within its shared-memory "
                                  "region, or an object smaller than the region",
    "SHARED_MEMORY_FORBIDDEN": "an object the server will not map: not a regular file of the "
                               "server's user (a symbolic link, a FIFO, another user's)",
}



class ServiceError(Exception):
    """Base: a request was refused; the message says what was wrong and what was expected."""

    code = "internal"
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason
        if self.reason not in REASONS:
            raise ValueError(f"unknown error reason {self.reason!r}")
        self.metadata = dict(metadata or {})
        # seconds after which the same request may succeed (gRPC RetryInfo, HTTP Retry-After)
        self.retry_after = retry_after


class InvalidArgument(ServiceError):
    code = "invalid_argument"
    default_reason = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "not_found"
    default_reason = "SESSION_NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "already_exists"
    default_reason = "SESSION_EXISTS"


class FailedPrecondition(ServiceError):
    code = "failed_precondition"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "resource_exhausted"
    default_reason = "QUOTA_EXCEEDED"


class TooManyRequests(ResourceExhausted):
    """A per-tenant rate or concurrency quota: the same request succeeds later
    (``retry_after`` says when; HTTP answers 429 with Retry-After)."""

    default_reason = "RATE_LIMITED"


class Unauthenticated(ServiceError):
    code = "unauthenticated"
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller is known, but its role does not allow the request."""

    code = "permission_denied"
    default_reason = "PERMISSION_DENIED"


class Unavailable(ServiceError):
    """The server cannot do the request now through no fault of it (the data directory
    is not writable); nothing changed, and it may succeed later."""

    code = "unavailable"
    default_reason = "DATA_DIR_UNAVAILABLE"


class Aborted(ServiceError):
    """A round of a synchronous session failed (straggler timeout): nothing was applied,
    and the workers may push for the same step again."""

    code = "aborted"
    default_reason = "ROUND_ABORTED"


class DeadlineExceeded(ServiceError):
    """A wait (a pull for a step not reached yet) ran out of time; nothing changed."""

    code = "deadline_exceeded"
    default_reason = "WAIT_TIMEOUT"
