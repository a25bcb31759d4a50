"""The gateway's own errors (each carries its status, type and code) and the one OpenAI error envelope."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.responses import Response

from serve.errors import RaygateError

logger = logging.getLogger(__name__)


class GatewayError(RaygateError):
    """Base of errors the gateway raises itself."""


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ServiceDisabled(NotFound):
    default_code = "not_enabled"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RequestTimeout(GatewayError):
    status = 504
    default_code = "timeout"


class QuotaExceeded(GatewayError):
    """A rate limit or concurrency cap: retry after `retry_after_s`."""

    status = 429
    type = "requests"
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
    type = "tokens"


class BudgetExhausted(QuotaExceeded):
    """A daily or monthly token budget is spent: retrying now will not help."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"


class KeyStoreUnavailable(GatewayError):
    """The key database cannot be reached."""

    status = 503
    default_code = "key_store_unavailable"
    retry_after_s = 1


class ReplicaBusy(GatewayError):
    """The replica holds as many requests as it takes (`max_ongoing_requests` + `max_queued_requests`)."""

    status = 503
    default_code = "replica_busy"
    retry_after_s = 1


class NoReplicaServing(GatewayError):
    """No gateway replica listens on this node (the last one died and Serve is starting another)."""

    status = 503
    default_code = "no_replica"
    retry_after_s = 2


class QuotaUnavailable(GatewayError):
    """The quota store cannot be reached and the policy is fail_closed."""

    status = 503
    default_code = "quota_unavailable"
    retry_after_s = 1


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception is answered with (500 for anything not raygate's own)."""
    return exc.status if isinstance(exc, RaygateError) else 500


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, envelope, headers) for any exception; unknown ones become a logged 500."""
    if isinstance(exc, RaygateError):
        status, kind, message, param, code = exc.status, exc.type, exc.message, exc.param, exc.code
    else:
        logger.exception("unhandled error", exc_info=exc)
        status, kind = 500, "server_error"
        message, param, code = "The server had an error while processing your request.", None, "internal_error"
    headers: dict[str, str] = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, int(retry_after)))
    if isinstance(exc, BudgetExhausted):
        headers["x-should-retry"] = "false"
    envelope = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, envelope, headers


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
