"""Domain errors. Each transport maps them to its own status codes, one table each.

They sit outside the layers so every layer may raise them.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base: a request was refused; the message says what was wrong and what was expected."""

    code = "internal"


class InvalidArgument(ServiceError):
    code = "invalid_argument"


class NotFound(ServiceError):
    code = "not_found"


class AlreadyExists(ServiceError):
    code = "already_exists"


class FailedPrecondition(ServiceError):
    code = "failed_precondition"


class ResourceExhausted(ServiceError):
    code = "resource_exhausted"


class Unauthenticated(ServiceError):
    code = "unauthenticated"


class Aborted(ServiceError):
    """A round of a synchronous session failed (straggler timeout): nothing was applied,
    and the workers may push for the same step again."""

    code = "aborted"


class DeadlineExceeded(ServiceError):
    """A wait (a pull for a step not reached yet) ran out of time; nothing changed."""

    code = "deadline_exceeded"
