"""One JSON shape for every error: ``{"error": {"code", "message", "detail"}}``.

Library errors keep their message (it names the problem); anything unexpected becomes
a 500 with no traceback and no internals in the body (the log has them).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path

from app.errors import AppError
from app.middleware import BodyTooLarge, too_large_error
from ml.errors import ConfigError, DataError, NotFittedError, PCBMError, ShapeError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_input",
    429: "rate_limited", 503: "unavailable",
}
# DataError covers unreadable input and refused paths (400); the others are well-formed
# requests the library cannot process as asked (422).
_LIBRARY_ERRORS: list[tuple[type[PCBMError], int, str]] = [
    (DataError, 400, "data_error"),
    (ShapeError, 422, "shape_error"),
    (ConfigError, 422, "config_error"),
    (NotFittedError, 422, "not_fitted"),
    (PCBMError, 422, "library_error"),
]


def error_response(status: int, code: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "detail": detail}},
                        status_code=status, headers=headers)


def _app_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return error_response(exc.status_code, exc.code, exc.message, exc.detail, exc.headers)


def _library_error(_request: Request, exc: Exception) -> JSONResponse:
    for kind, status, code in _LIBRARY_ERRORS:
        if isinstance(exc, kind):
            return error_response(status, code, str(exc))
    return error_response(422, "library_error", str(exc))  # unreachable: PCBMError is last above


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Location, message and type only: the offending input is never echoed back.
    errors = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"])
    return error_response(422, "validation_error", f"invalid request: {where}: {first['msg']}" if where
                          else f"invalid request: {first['msg']}", errors)


def _allowed_methods(request: Request) -> str | None:
    """Every method some route accepts at this path (Starlette's own 405 names only one route's)."""
    path = get_route_path(request.scope)
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods)) or None


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
    headers = dict(exc.headers) if exc.headers else {}
    if status == 405 and (allowed := _allowed_methods(request)):
        headers["Allow"] = allowed
    return error_response(status, _HTTP_CODES.get(status, "http_error"), message, None, headers or None)


def _body_too_large(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return JSONResponse(too_large_error(exc.limit), status_code=413, headers={"Connection": "close"})


def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database error: %s", exc)
    return error_response(503, "database_unavailable", "the database is unavailable or busy; retry shortly",
                          None, {"Retry-After": "2"})


def _out_of_range(_request: Request, exc: Exception) -> JSONResponse:
    # A number the database cannot hold (SQLite: 64-bit integers) names no object and sets
    # no value; without this the driver's OverflowError would be a 500.
    log.info("number out of range: %s", exc)
    return error_response(422, "out_of_range", "a number in the request is too large")


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(PCBMError, _library_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)  # every connection busy: overload, not a bug
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(Exception, _unexpected)
