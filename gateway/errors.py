"""The gateway's own errors (each carries its status, type and code) and the one OpenAI error envelope."""

from __future__ import annotations

import logging
from typing import Any, Literal

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


class EndpointNotAllowed(GatewayError):
    """The key's endpoint allow-list leaves this endpoint out."""

    status = 403
    type = "permission_error"
    default_code = "endpoint_not_allowed"


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
    """A token or spend budget is spent: retrying now will not help."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, kind: str = "day",
                 subject: str | None = None) -> None:
        super().__init__(message, headers=headers, kind=kind)
        self.subject = subject  # the key or team (`key:<id>`, `team:<name>`) whose budget it is


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


Shape = Literal["openai", "anthropic"]

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); its SDK raises by status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}


def shape_of(path: str) -> Shape:
    """The error envelope a route answers with: Anthropic's on `/v1/messages`, OpenAI's everywhere else."""
    return "anthropic" if path.endswith("/v1/messages") or "/v1/messages/" in path else "openai"  # under any prefix


def anthropic_envelope(status: int, openai_envelope: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    """Anthropic's `{"type": "error", "error": {type, message}}` for what OpenAI's envelope says."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    doc: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": openai_envelope["error"]["message"]}}
    if request_id:
        doc["request_id"] = request_id
    return doc


def error_response(
    exc: BaseException, request_id: str | None = None, extra_headers: dict[str, str] | None = None,
    shape: Shape = "openai",
) -> Response:
    status, envelope, headers = error_body(exc)
    headers.update(extra_headers or {})
    if request_id and status >= 500:
        logger.warning("request %s failed: %s %s", request_id, status, envelope["error"]["code"])
    doc = anthropic_envelope(status, envelope, request_id) if shape == "anthropic" else envelope
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def sse_error_event(exc: BaseException, shape: Shape = "openai") -> bytes:
    """The SSE form, for an error after a stream has started (OpenAI's is followed by [DONE]; Anthropic's is an
    `error` event, the stream's last)."""
    status, envelope, _ = error_body(exc)
    if shape == "anthropic":
        return b"event: error\ndata: " + orjson.dumps(anthropic_envelope(status, envelope, None)) + b"\n\n"
    return b"data: " + orjson.dumps(envelope) + b"\n\n"
