"""The one OpenAI error envelope and the one exception-type -> HTTP status mapper."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from serve.errors import (
    EngineError,
    EngineFailure,
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
)

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """Base of errors the gateway raises itself."""

    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code


class AuthenticationFailed(GatewayError):
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    default_code = "model_not_allowed"


class NotFound(GatewayError):
    default_code = "not_found"


class MethodNotAllowed(GatewayError):
    default_code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    default_code = "request_too_large"


class RequestTimeout(GatewayError):
    default_code = "timeout"


class ServiceDisabled(GatewayError):
    default_code = "not_enabled"


class QuotaExceeded(GatewayError):
    """A rate limit or concurrency cap: retry after `retry_after_s`."""

    default_code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after_s: int | None = None, headers: dict[str, str] | None = None,
        kind: str = "requests",
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.kind = kind  # which limit: requests, tokens, concurrent, day, month


class TokenRateExceeded(QuotaExceeded):
    pass


class BudgetExhausted(QuotaExceeded):
    """A daily or monthly token budget is spent: retrying now will not help."""

    default_code = "insufficient_quota"


class KeyStoreUnavailable(GatewayError):
    """The key database cannot be reached."""

    default_code = "key_store_unavailable"
    retry_after_s = 1


class QuotaUnavailable(GatewayError):
    """The quota store cannot be reached and the policy is fail_closed."""

    default_code = "quota_unavailable"
    retry_after_s = 1


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str


# Status by exception *type*; the most specific class in the MRO wins.
ERROR_SPECS: dict[type[BaseException], ErrorSpec] = {
    InvalidRequest: ErrorSpec(400, "invalid_request_error"),
    AuthenticationFailed: ErrorSpec(401, "invalid_request_error"),
    PermissionDenied: ErrorSpec(403, "permission_error"),
    ModelNotFound: ErrorSpec(404, "invalid_request_error"),
    NotFound: ErrorSpec(404, "invalid_request_error"),
    MethodNotAllowed: ErrorSpec(405, "invalid_request_error"),
    PayloadTooLarge: ErrorSpec(413, "invalid_request_error"),
    RequestTimeout: ErrorSpec(504, "server_error"),
    QuotaExceeded: ErrorSpec(429, "requests"),
    TokenRateExceeded: ErrorSpec(429, "tokens"),
    BudgetExhausted: ErrorSpec(429, "insufficient_quota"),
    QuotaUnavailable: ErrorSpec(503, "server_error"),
    KeyStoreUnavailable: ErrorSpec(503, "server_error"),
    ServiceDisabled: ErrorSpec(404, "invalid_request_error"),
    EngineOverloaded: ErrorSpec(503, "server_error"),
    EngineUnavailable: ErrorSpec(503, "server_error"),
    EngineFailure: ErrorSpec(500, "server_error"),
    EngineError: ErrorSpec(500, "server_error"),
}
_INTERNAL = ErrorSpec(500, "server_error")


def spec_for(exc: BaseException) -> ErrorSpec:
    for cls in type(exc).__mro__:
        spec = ERROR_SPECS.get(cls)
        if spec is not None:
            return spec
    return _INTERNAL


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, envelope, headers) for any exception; unknown ones become a logged 500."""
    spec = spec_for(exc)
    if isinstance(exc, (EngineError, GatewayError)):
        message, param, code = exc.message, exc.param, exc.code
    else:
        logger.exception("unhandled error", exc_info=exc)
        message, param, code = "The server had an error while processing your request.", None, "internal_error"
    headers: dict[str, str] = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, int(retry_after)))
    if isinstance(exc, BudgetExhausted):
        headers["x-should-retry"] = "false"
    envelope = {"error": {"message": message, "type": spec.type, "param": param, "code": code}}
    return spec.status, envelope, headers


def error_response(
    exc: BaseException, request_id: str | None = None, extra_headers: dict[str, str] | None = None
) -> Response:
    status, envelope, headers = error_body(exc)
    headers.update(extra_headers or {})
    if request_id and status >= 500:
        logger.warning("request %s failed: %s %s", request_id, status, envelope["error"]["code"])
    return Response(orjson.dumps(envelope), status_code=status, media_type="application/json", headers=headers)


def sse_error_event(exc: BaseException) -> bytes:
    """The SSE form, for an error after a stream has started (followed by [DONE])."""
    _, envelope, _ = error_body(exc)
    return b"data: " + orjson.dumps(envelope) + b"\n\n"
