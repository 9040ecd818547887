"""One error envelope for every 4xx/5xx: ``{"error": {"code", "message", "details"}}``.

A dependency that is down (database, broker, storage) answers 503 with Retry-After, never 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.storage import StorageError

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers


MAX_DETAILS = 100


def cap_details(details: list[dict[str, Any]], limit: int = MAX_DETAILS) -> list[dict[str, Any]]:
    """The first ``limit`` problems and, when there were more, one entry counting the rest: a flood of
    bad rows gets a bounded answer."""
    if len(details) <= limit:
        return details
    return details[:limit] + [{"message": f"and {len(details) - limit} more problems not listed", "more": len(details) - limit}]


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident!r} was not found")


def error_response(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"code": code, "message": message, "details": details or []}})


def _unavailable(what: str) -> JSONResponse:
    return error_response(503, f"{what}_unavailable", f"the {what} is unreachable; retry shortly",
                          headers={"Retry-After": str(RETRY_AFTER_S)})


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        out.append({"field": ".".join(loc), "message": err.get("msg", "invalid"), "type": err.get("type")})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", "the request is invalid", _validation_details(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError):
        log.warning("database unavailable: %s", exc.orig if hasattr(exc, "orig") else exc)
        return _unavailable("database")

    @app.exception_handler(IntegrityError)
    async def _conflict(_: Request, exc: IntegrityError):
        # A constraint refused a write that raced another request (or a bug let a duplicate
        # through): the caller may retry; never a 500.
        log.warning("integrity error answered 409: %s", getattr(exc, "orig", exc))
        return error_response(409, "conflict", "the request conflicts with the current state of a resource; retry it",
                              headers={"Retry-After": "1"})

    @app.exception_handler(DataError)
    async def _bad_value(_: Request, exc: DataError):
        # The database refused a value the request carried (a NUL character, a number out of
        # range, a string too long for its column): the request is at fault, not the server.
        log.warning("data error answered 422: %s", getattr(exc, "orig", exc))
        return error_response(422, "invalid_request", "a value in the request cannot be stored (e.g. a NUL character "
                                                      "or a number out of range)")

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(_: Request, exc: PoolTimeout):
        log.warning("database pool exhausted: %s", exc)
        return _unavailable("database")

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError):
        if exc.connection_invalidated or isinstance(exc, InterfaceError):
            return _unavailable("database")
        log.exception("database error")
        return error_response(500, "internal_error", "an internal error occurred")

    @app.exception_handler(StorageError)
    async def _storage_down(_: Request, exc: StorageError):
        log.warning("storage unavailable: %s", exc)
        return _unavailable("storage")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an internal error occurred")
