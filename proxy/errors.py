"""One error type for the HTTP layer and the handlers that write OpenAI's error envelope.

Every error body is ``{"error": {"message", "type", "param", "code"}}``.
Exceptions carry their status, type and code; nothing here inspects message
text to pick a status.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from backends.errors import BackendError
from proxy.manager.errors import ManagerError
from proxy.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the API answers with, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _STATUS_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def of(cls, exc: BackendError | ManagerError) -> APIError:
        """The answer to an error of the model layer or the model manager, which carry their status and code."""
        headers = {}
        if isinstance(exc, ManagerError):
            if exc.retry_after is not None:
                headers["Retry-After"] = str(exc.retry_after)
            if not exc.retryable:  # the OpenAI SDKs would send the same request again, to fail again
                headers["x-should-retry"] = "false"
        return cls(exc.status, exc.message, error_type=exc.error_type, param=exc.param, code=exc.code, headers=headers)

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorDetail(message=self.message, type=self.error_type, param=self.param, code=self.code))


_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def from_decode_error(exc: msgspec.DecodeError) -> APIError:
    """A 400 for a request body that is not JSON, or not of the expected shape; ``param`` names the field."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return APIError(400, f"The request body is not valid JSON: {text}", code="invalid_json")
    match = _MSGSPEC_PATH.match(text)
    message, path = (match["message"], match["path"]) if match else (text, None)
    param = path.lstrip(".") if path else None
    missing = _MISSING_FIELD.search(message)
    if missing:
        param = f"{param}.{missing[1]}" if param else missing[1]
    where = f" (at '{param}')" if param else ""
    return APIError(
        400,
        f"Invalid request body: {message}{where}",
        param=param or None,
        code="invalid_value" if param else "invalid_body",
    )


def error_response(error: APIError) -> Response[Any]:
    return Response(content=error.body(), status_code=error.status, media_type=MediaType.JSON, headers=error.headers)


def handle_api_error(_: Request[Any, Any, Any], exc: APIError) -> Response[Any]:
    return error_response(exc)


def handle_status_error(_: Request[Any, Any, Any], exc: BackendError | ManagerError) -> Response[Any]:
    if isinstance(exc, BackendError) and exc.status >= 500:  # a model that failed; the manager's are refusals
        logger.error("%s: %s", type(exc).__name__, exc.message)
    return error_response(APIError.of(exc))


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own errors (unknown route, wrong method, body too large...) in OpenAI's shape."""
    status = exc.status_code
    message = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            message = f"{message}: {first.get('message', '')}".rstrip(": ")
    if status == 404:
        message = "Not found: no such route or resource"
    headers = dict(exc.headers or {})
    return error_response(APIError(status, message, code=None, headers=headers))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Anything unforeseen: logged with its traceback, answered without it."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        APIError(500, f"Internal server error ({type(exc).__name__}); see the server log", code="internal_error")
    )


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    APIError: handle_api_error,
    BackendError: handle_status_error,
    ManagerError: handle_status_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
