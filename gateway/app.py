"""`create_app(settings, backend)`: the FastAPI application of the gateway."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from gateway import service
from gateway.auth import KeyAuthenticator
from gateway.backend import ModelBackend
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, error_response
from gateway.settings import GatewaySettings
from serve.engine import Endpoint
from serve.errors import EngineError, InvalidRequest

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": {"application/json": {}}}
    for code, desc in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
        503: "Engine overloaded or unavailable (Retry-After)",
    }.items()
}


def _request_id(request: Request) -> str:
    """The caller's (or Serve's) `x-request-id`, else a new one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return rid


def _id_headers(request: Request, rid: str) -> dict[str, str]:
    # Serve echoes an incoming x-request-id itself; set it only when nobody else will.
    return {} if "x-request-id" in request.headers else {"x-request-id": rid}


def create_app(settings: GatewaySettings, backend: ModelBackend) -> FastAPI:
    """Build the gateway; all state lives on `app.state`, nothing at module level."""
    app = FastAPI(title="raygate", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.backend = backend
    authenticator = KeyAuthenticator(settings.accepted_keys())

    async def authenticate(request: Request) -> None:  # async: no thread-pool hop per request
        authenticator.authenticate(request)

    auth_dep = [Depends(authenticate)]

    def _error(request: Request, exc: Exception) -> Response:
        rid = _request_id(request)
        return error_response(exc, rid, _id_headers(request, rid))

    async def _known_error(request: Request, exc: Exception) -> Response:
        return _error(request, exc)

    app.add_exception_handler(GatewayError, _known_error)
    app.add_exception_handler(EngineError, _known_error)
    app.add_exception_handler(Exception, _known_error)  # last resort: a logged 500 in the envelope

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            err: Exception = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
        elif exc.status_code == 404:
            err = NotFound(f"Unknown path {request.url.path}.")
        else:
            err = InvalidRequest(str(exc.detail))
        return _error(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(request, InvalidRequest(str(exc.errors()[0].get("msg"))))

    @app.get("/health", include_in_schema=True)
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/ready")
    async def ready() -> Response:
        states = await backend.readiness()
        ok = bool(states) and all(states.values())
        body = {"status": "ready" if ok else "not_ready", "models": states}
        return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/v1/models", dependencies=auth_dep, responses=ERROR_RESPONSES)
    async def list_models(request: Request) -> Response:
        data = [c.model_dump(exclude_none=True) for c in backend.cards()]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.get("/v1/models/{model_id:path}", dependencies=auth_dep, responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> Response:
        return Response(orjson.dumps(backend.resolve(model_id).card.model_dump(exclude_none=True)),
                        media_type="application/json")

    async def run(endpoint: Endpoint, request: Request) -> Response:
        rid = _request_id(request)
        body = await service.read_json(request, settings.max_request_bytes)
        service.validate(endpoint, body)
        try:
            result = await service.generate(backend, endpoint, body, rid, request, settings.request_timeout_s)
        except service.ClientDisconnected:
            return Response(status_code=499)
        headers = _id_headers(request, rid)
        if isinstance(result, bytes):
            return Response(result, media_type="application/json", headers=headers)
        stream: AsyncIterator[bytes] = service.sse(result, rid)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
        )

    stream_ok: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}

    @app.post("/v1/chat/completions", dependencies=auth_dep, responses={**stream_ok, **ERROR_RESPONSES})
    async def chat_completions(request: Request) -> Response:
        return await run("chat", request)

    @app.post("/v1/completions", dependencies=auth_dep, responses={**stream_ok, **ERROR_RESPONSES})
    async def completions(request: Request) -> Response:
        return await run("completion", request)

    return app
