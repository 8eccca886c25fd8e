"""Exceptions the client raises: one per server status, each also a familiar builtin.

Both transports name their statuses alike (gRPC ``INVALID_ARGUMENT`` is the HTTP
error body's ``"code": "invalid_argument"``), so one table, :data:`BY_CODE`, maps
either to an exception class. Every exception carries the server's message
unchanged, the status ``code``, the server ``url``, and the stable ``reason`` and
string ``metadata`` of the server's google.rpc.ErrorInfo (gRPC: the status details in
the trailing metadata ``grpc-status-details-bin``; HTTP: the error body's ``reason``
and ``metadata``). Branch on the reason, never on the message:

.. code-block:: python

    try:
        opt.step()
    except adamserve_client.FailedPrecondition as exc:
        if exc.reason != "STALE_PUSH":
            raise
        opt.pull()

=====================  =======================  ===================================
gRPC status / HTTP      exception                also an instance of
=====================  =======================  ===================================
INVALID_ARGUMENT / 400  :class:`InvalidArgument`  ``ValueError``
NOT_FOUND / 404         :class:`NotFound`         ``KeyError`` (so ``LookupError``)
ALREADY_EXISTS / 409    :class:`AlreadyExists`    ``ValueError``
FAILED_PRECONDITION     :class:`FailedPrecondition` ``RuntimeError`` (the server's state,
  / 409                                           not the request, is in the way)
RESOURCE_EXHAUSTED      :class:`ResourceExhausted` (a server limit; deliberately not
  / 413, 429                                      ``MemoryError``, which means *this*
                                                  process ran out of memory)
UNAUTHENTICATED / 401   :class:`Unauthenticated`  ``PermissionError``
PERMISSION_DENIED       :class:`PermissionDenied` :class:`Unauthenticated` (a known key
  / 403                                           whose role does not allow the request)
UNAVAILABLE / 503, no   :class:`Unavailable`      ``ConnectionError`` (names the URL)
  server
DEADLINE_EXCEEDED       :class:`DeadlineExceeded` ``TimeoutError``
  / 408
ABORTED / 409           :class:`Aborted`          ``RuntimeError`` (a synchronous round
                                                  failed: nothing applied; push again)
anything else / 5xx     :class:`ServerError`      ``RuntimeError``
=====================  =======================  ===================================

The server's reasons (``STALE_PUSH``, ``ROUND_ABORTED``, ``QUOTA_EXCEEDED``,
``CHECKPOINTS_DISABLED``, ``SESSION_NOT_FOUND``, ...) are listed in the proto's
header comment. An error without one (an old server, a proxy's answer) gets its
class's default, the one the server gives for that status. Errors the client raises
itself have reasons of their own, in :data:`CLIENT_REASONS`.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "BY_CODE",
    "CLIENT_REASONS",
    "Aborted",
    "AdamserveError",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "error_for",
]


# Reasons of the errors the client raises itself (the server's are in the proto).
CLIENT_REASONS: dict[str, str] = {
    "UNAVAILABLE": "the server could not be reached, after the client's bounded retries",
    "DEADLINE_EXCEEDED": "no answer within the client's own timeout",
    "BAD_RESPONSE": "the server's answer is malformed (a stream without its status, a "
                    "tensor past its end, an unreadable state blob)",
    "INVALID_ARGUMENT": "a value the wire cannot carry (an unknown algorithm or mode)",
    "SHARD_ORDER": "the servers given are not one sharded session's shards, in order",
    "SHARDS_DIVERGED": "the shards of a session are at different steps: restore them "
                       "to a checkpoint they all hold",
    "CHECKPOINT_INCOMPLETE": "the shards checkpointed different steps",
    "SESSION_SHARDED": "an operation a sharded session cannot do (grow, or commit by hand)",
}


class AdamserveError(Exception):
    """Base of every error the client raises for a refused or failed request.

    ``message`` is the server's text (or the client's, for a server it could not
    reach); ``code`` the status name in lower case (``"invalid_argument"``);
    ``url`` the server's address; ``reason`` the stable UPPER_SNAKE_CASE reason
    (the server's ErrorInfo reason, else the class's default); ``metadata`` the
    ErrorInfo's string metadata (``session_id``, ``step``...), empty when none;
    ``retry_after`` the seconds the server asks to wait before the same request may
    succeed (a tenant's rate or calls-in-flight quota), None when it gave no hint.
    """

    code = "unknown"
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, code: str | None = None, url: str | None = None,
                 reason: str | None = None, metadata: Mapping[str, str] | None = None,
                 retry_after: float | None = None) -> None:
        self.message = message
        self.retry_after = retry_after
        if code is not None:
            self.code = code
        self.url = url
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError would quote the message; show it as the server wrote it.
        return self.message


class InvalidArgument(AdamserveError, ValueError):
    """The server refused the request as malformed; nothing changed on the server."""

    code = "invalid_argument"
    default_reason = "INVALID_ARGUMENT"


class NotFound(AdamserveError, KeyError):
    """No such session (or other named thing) on the server."""

    code = "not_found"
    default_reason = "SESSION_NOT_FOUND"


class AlreadyExists(AdamserveError, ValueError):
    """A session with that id exists already."""

    code = "already_exists"
    default_reason = "SESSION_EXISTS"


class FailedPrecondition(AdamserveError, RuntimeError):
    """The request is well formed but the server cannot do it now (e.g. checkpoints off)."""

    code = "failed_precondition"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(AdamserveError):
    """A server limit was hit: state memory, request body size, rate."""

    code = "resource_exhausted"
    default_reason = "QUOTA_EXCEEDED"


class Unauthenticated(AdamserveError, PermissionError):
    """Missing or wrong token."""

    code = "unauthenticated"
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(Unauthenticated):
    """The key is known, but its role does not allow the request (a read-only key
    changing a session, a tenant's key acting server-wide)."""

    code = "permission_denied"
    default_reason = "PERMISSION_DENIED"


class Unavailable(AdamserveError, ConnectionError):
    """The server could not be reached (after the client's bounded retries)."""

    code = "unavailable"
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(AdamserveError, TimeoutError):
    """The call did not finish within the client's timeout."""

    code = "deadline_exceeded"
    default_reason = "DEADLINE_EXCEEDED"


class Aborted(AdamserveError, RuntimeError):
    """A synchronous round failed (straggler timeout): nothing was applied, and the
    same gradients may be pushed again."""

    code = "aborted"
    default_reason = "ROUND_ABORTED"


class ServerError(AdamserveError, RuntimeError):
    """The server failed (INTERNAL, an unexpected status); its log has the details."""

    code = "internal"
    default_reason = "INTERNAL"


BY_CODE: dict[str, type[AdamserveError]] = {
    "invalid_argument": InvalidArgument,
    "out_of_range": InvalidArgument,
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "failed_precondition": FailedPrecondition,
    "resource_exhausted": ResourceExhausted,
    "unauthenticated": Unauthenticated,
    "permission_denied": PermissionDenied,
    "unavailable": Unavailable,
    "deadline_exceeded": DeadlineExceeded,
    "aborted": Aborted,
}


def error_for(code: str, message: str, url: str | None = None, *, reason: str | None = None,
              metadata: Mapping[str, str] | None = None,
              retry_after: float | None = None) -> AdamserveError:
    """The exception for a status ``code`` (a gRPC status name or the HTTP body's code),
    with the server's ``reason`` and ``metadata`` (None: the class's default reason)."""
    key = code.lower()
    cls = BY_CODE.get(key, ServerError)
    return cls(message, code=key, url=url, reason=reason, metadata=metadata,
               retry_after=retry_after)
