"""Errors the app's services raise; the web layer maps each to one JSON error shape.

They carry an HTTP status because that is the vocabulary every client understands, but
they import nothing from the web framework, so services stay usable from the CLI.
"""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """A failure a caller can act on; ``message`` says what happened, ``detail`` adds data."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}


class InvalidInput(AppError):
    status_code = 422
    code = "invalid_input"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class VersionConflict(Conflict):
    """An edit was made on a version that is no longer the head; ``detail`` holds the head."""

    code = "version_conflict"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message, detail={"retry_after_s": retry_after_s}, headers={"Retry-After": str(retry_after_s)})


class Unavailable(AppError):
    status_code = 503
    code = "unavailable"


class DatabaseNotReady(Unavailable):
    """The database is unreachable or its schema is not at the code's migration head."""

    code = "database_not_ready"


class SchemaNotAtHead(DatabaseNotReady):
    """The database answers, but its schema is missing, older or newer than this code's."""

    code = "schema_not_at_head"
