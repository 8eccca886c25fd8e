"""Exceptions the client raises: one per server status, each also a familiar builtin.

Both transports name their statuses alike (gRPC ``INVALID_ARGUMENT`` is the HTTP
error body's ``"code": "invalid_argument"``), so one table, :data:`BY_CODE`, maps
either to an exception class. Every exception carries the server's message
unchanged, the status ``code`` and the server ``url``:

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
UNAVAILABLE, no server  :class:`Unavailable`      ``ConnectionError`` (names the URL)
DEADLINE_EXCEEDED       :class:`DeadlineExceeded` ``TimeoutError``
  / 408
ABORTED / 409           :class:`Aborted`          ``RuntimeError`` (a synchronous round
                                                  failed: nothing applied; push again)
anything else / 5xx     :class:`ServerError`      ``RuntimeError``
=====================  =======================  ===================================
"""

from __future__ import annotations

__all__ = [
    "BY_CODE",
    "Aborted",
    "AdamserveError",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "error_for",
]


class AdamserveError(Exception):
    """Base of every error the client raises for a refused or failed request.

    ``message`` is the server's text (or the client's, for a server it could not
    reach); ``code`` the status name in lower case (``"invalid_argument"``);
    ``url`` the server's address.
    """

    code = "unknown"

    def __init__(self, message: str, *, code: str | None = None, url: str | None = None) -> None:
        self.message = message
        if code is not None:
            self.code = code
        self.url = url
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError would quote the message; show it as the server wrote it.
        return self.message


class InvalidArgument(AdamserveError, ValueError):
    """The server refused the request as malformed; nothing changed on the server."""

    code = "invalid_argument"


class NotFound(AdamserveError, KeyError):
    """No such session (or other named thing) on the server."""

    code = "not_found"


class AlreadyExists(AdamserveError, ValueError):
    """A session with that id exists already."""

    code = "already_exists"


class FailedPrecondition(AdamserveError, RuntimeError):
    """The request is well formed but the server cannot do it now (e.g. checkpoints off)."""

    code = "failed_precondition"


class ResourceExhausted(AdamserveError):
    """A server limit was hit: state memory, request body size, rate."""

    code = "resource_exhausted"


class Unauthenticated(AdamserveError, PermissionError):
    """Missing or wrong token."""

    code = "unauthenticated"


class Unavailable(AdamserveError, ConnectionError):
    """The server could not be reached (after the client's bounded retries)."""

    code = "unavailable"


class DeadlineExceeded(AdamserveError, TimeoutError):
    """The call did not finish within the client's timeout."""

    code = "deadline_exceeded"


class Aborted(AdamserveError, RuntimeError):
    """A synchronous round failed (straggler timeout): nothing was applied, and the
    same gradients may be pushed again."""

    code = "aborted"


class ServerError(AdamserveError, RuntimeError):
    """The server failed (INTERNAL, an unexpected status); its log has the details."""

    code = "internal"


BY_CODE: dict[str, type[AdamserveError]] = {
    "invalid_argument": InvalidArgument,
    "out_of_range": InvalidArgument,
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "failed_precondition": FailedPrecondition,
    "resource_exhausted": ResourceExhausted,
    "unauthenticated": Unauthenticated,
    "permission_denied": Unauthenticated,
    "unavailable": Unavailable,
    "deadline_exceeded": DeadlineExceeded,
    "aborted": Aborted,
}


def error_for(code: str, message: str, url: str | None = None) -> AdamserveError:
    """The exception for a status ``code`` (a gRPC status name or the HTTP body's code)."""
    key = code.lower()
    cls = BY_CODE.get(key, ServerError)
    return cls(message, code=key, url=url)
