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
