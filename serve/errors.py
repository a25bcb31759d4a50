"""raygate's error base and the engines' error types; each carries the HTTP status the gateway answers with."""

from __future__ import annotations


class RaygateError(Exception):
    """Base of every error raygate answers a request with: its HTTP status, OpenAI error type and code.

    The gateway's error envelope reads these attributes; no table elsewhere maps a type to a status.
    """

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None
    retry_after_s: int | None = None  # set: the answer carries Retry-After

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code


class EngineError(RaygateError):
    """Something an engine refused or failed to do."""


class InvalidRequest(EngineError):
    """The request is malformed or out of range."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_tokens exceed the model's context."""

    default_code = "context_length_exceeded"


class ModelNotFound(EngineError):
    """No deployment serves the requested model."""

    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class EngineOverloaded(EngineError):
    """The engine's queue is full; retry later."""

    status = 503
    default_code = "engine_overloaded"

    def __init__(self, message: str = "The engine is overloaded; retry later.", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class EngineUnavailable(EngineError):
    """The engine is starting, stopped or unhealthy, or refuses raygate's own credentials; retry after a second."""

    status = 503
    default_code = "engine_unavailable"
    retry_after_s = 1


class EngineFailure(EngineError):
    """The engine failed while generating (not the client's fault)."""

    default_code = "engine_error"


def error_for_status(
    status: int, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: int | None = None,
) -> EngineError:
    """The engine error for an HTTP status an engine answered with (vLLM's serving classes or an upstream server).

    The one mapping: 429 is overloaded and 503 unavailable, both retryable elsewhere (with the engine's
    Retry-After); 401, 403 and 404 mean raygate's own credentials or model name are wrong, not the client's
    request, so they are unavailable too; other 4xx are the client's; everything else is a failure.
    """
    if status == 429:
        return EngineOverloaded(message, retry_after_s=retry_after_s or 1)
    if status in (401, 403, 404, 503):
        exc: EngineError = EngineUnavailable(message, code=code)
        if retry_after_s:
            exc.retry_after_s = retry_after_s
        return exc
    if 400 <= status < 500 or status == 501:
        return InvalidRequest(message, param=param, code=code)
    return EngineFailure(message, code=code)


_WIRE_TYPES: dict[str, type[EngineError]] = {
    t.__name__: t for t in (EngineError, InvalidRequest, ContextLengthExceeded, EngineOverloaded, EngineUnavailable,
                            EngineFailure)
}


def to_wire(exc: EngineError) -> dict[str, object]:
    """An engine error as plain data, to cross a process boundary (a Serve handle) with its type and fields."""
    return {"error": type(exc).__name__, "message": exc.message, "param": exc.param, "code": exc.code,
            "retry_after_s": getattr(exc, "retry_after_s", None)}


def from_wire(data: dict[str, object]) -> EngineError:
    """The engine error `to_wire` described (an unknown type becomes an EngineFailure)."""
    kind = _WIRE_TYPES.get(str(data.get("error")), EngineFailure)
    message = str(data.get("message") or "engine error")
    if kind is EngineOverloaded:
        return EngineOverloaded(message, retry_after_s=int(data.get("retry_after_s") or 1))  # type: ignore[call-overload]
    exc = kind(message)
    exc.param = data.get("param")  # type: ignore[assignment]
    exc.code = data.get("code")  # type: ignore[assignment]
    return exc


def param_from_validation_error(exc: object) -> str | None:
    """The offending parameter of a pydantic ValidationError, as a dotted path."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return None
    try:
        first = errors()[0]
    except (IndexError, TypeError):
        return None
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # pydantic puts the union member or validator name last for some errors
    loc = [p for p in loc if not p.startswith("function-") and p not in ("str", "int", "list[str]", "list[int]")]
    if not loc:
        return None
    out = loc[0]
    for part in loc[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out
