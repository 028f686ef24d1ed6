"""RFC 9457 problem details (``application/problem+json``) for every error the service returns.

``type`` is stable: ``https://medseg.dev/problems/<code>``, where ``<code>`` is a
:class:`medseg.errors.MedsegError` code (input errors, with that error's HTTP status) or one of the
service's own codes below (authentication, routing, request validation). Client mistakes are
always 4xx; 5xx means a fault of the service itself. A storage fault (the job store locked or
down, the data folder unwritable or full) is ``503 unavailable`` with ``Retry-After``
(``Settings.retry_after_s`` seconds): the request was fine and may be sent again.
"""

from __future__ import annotations

import errno
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from medseg.errors import MedsegError

PROBLEM_BASE = "https://medseg.dev/problems/"
MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("medseg.service")

# HTTP status -> stable problem code, for errors raised by routing / Starlette itself
STATUS_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    408: "request-timeout",
    409: "conflict",
    410: "gone",
    413: "too-large",
    415: "unsupported-media-type",
    422: "invalid-request",
    429: "too-many-requests",
    500: "internal-error",
    503: "unavailable",
}

#: errno values of an ``OSError`` that mean the service's own storage is unusable (503): no
#: permission, read-only, full or over quota, I/O error, or a path component that is a file
#: (``incoming`` replaced by a file: ENOTDIR / EEXIST)
STORAGE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EIO", "ENOTDIR", "EEXIST")
    if hasattr(errno, name)
)
#: methods a 405's ``Allow`` header may list, in the order it lists them
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_RETRY_AFTER_S = 5


class Problem(Exception):
    """An HTTP-level error of the service (auth, not found, wrong media type...)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra


def problem_body(status: int, code: str, detail: str, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    """The problem+json object: type, title, status, detail (+ instance, extension members)."""
    body = {"type": PROBLEM_BASE + code, "title": _title(status, code), "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_of(error: BaseException) -> dict[str, Any]:
    """The problem+json object for any exception (used for job errors too)."""
    if isinstance(error, MedsegError):
        return problem_body(error.http_status, error.code, str(error))
    if isinstance(error, Problem):
        return problem_body(error.status, error.code, error.detail, **error.extra)
    return problem_body(500, "internal-error", "internal error while processing the job")


def problem_response(
    status: int,
    code: str,
    detail: str,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    instance = str(request.url.path) if request is not None else None
    return JSONResponse(
        problem_body(status, code, detail, instance, **extra),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )


def install_handlers(app: FastAPI) -> None:
    """Route every exception type to a problem+json response (validation errors -> 422)."""

    @app.exception_handler(MedsegError)
    async def _medseg(request: Request, error: MedsegError):
        return problem_response(error.http_status, error.code, str(error), request)

    @app.exception_handler(Problem)
    async def _problem(request: Request, error: Problem):
        return problem_response(error.status, error.code, error.detail, request, error.headers, **error.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        code = STATUS_CODES.get(error.status_code, f"http-{error.status_code}")
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 405:  # Starlette names only the first route's methods
            methods = allowed_methods(request)
            if methods:
                headers["Allow"] = ", ".join(methods)
        return problem_response(error.status_code, code, str(error.detail), request, headers or None)

    @app.exception_handler(OperationalError)
    async def _database(request: Request, error: OperationalError):
        return _unavailable(request, error, "the job store is busy or unavailable; retry later")

    @app.exception_handler(OSError)
    async def _os_error(request: Request, error: OSError):
        if is_storage_fault(error):
            return _unavailable(request, error, "the service cannot write its data; retry later")
        return await _internal(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in error.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(first['loc']) or 'request'}: {first['msg']}"
        return problem_response(422, "invalid-request", detail, request, errors=errors)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return problem_response(500, "internal-error", "internal server error", request)


def is_storage_fault(error: BaseException) -> bool:
    """The error says the service's storage is unusable (database or data folder), not that the
    request was wrong: ``sqlalchemy.exc.OperationalError`` or an ``OSError`` with an errno of
    :data:`STORAGE_ERRNOS`."""
    if isinstance(error, OperationalError):
        return True
    return isinstance(error, OSError) and (isinstance(error, PermissionError) or error.errno in STORAGE_ERRNOS)


def _unavailable(request: Request, error: BaseException, detail: str) -> JSONResponse:
    """503 ``unavailable`` with ``Retry-After`` for a storage fault; logged by type only (the
    message may carry paths or SQL)."""
    settings = getattr(request.app.state, "settings", None)
    retry_after = getattr(settings, "retry_after_s", DEFAULT_RETRY_AFTER_S)
    code = errno.errorcode.get(error.errno) if isinstance(error, OSError) and error.errno else None
    log.error("storage fault", extra={"path": request.url.path, "error": type(error).__name__, "errno": code})
    return problem_response(503, "unavailable", detail, request, {"Retry-After": str(int(retry_after))})


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at the request's path (for ``Allow``)."""
    routes = getattr(request.app, "routes", ())
    allowed = []
    for method in HTTP_METHODS:
        scope = {k: v for k, v in request.scope.items() if k != "fastapi"}
        scope["method"] = method
        for route in routes:
            try:
                match, _ = route.matches(scope)
            except Exception:  # a route that cannot judge this scope does not serve it
                continue
            if match == Match.FULL:
                allowed.append(method)
                break
    return allowed


def _title(status: int, code: str) -> str:
    """A short summary that is the same for every occurrence of a problem type (RFC 9457 3.1.3)."""
    return code.replace("-", " ").capitalize()


PROBLEM_SCHEMA = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json for the given statuses."""
    return {
        s: {
            "description": HTTPStatus(s).phrase,
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for s in statuses
    }
