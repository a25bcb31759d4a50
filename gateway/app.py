"""`create_app(settings, backend)`: the gateway's FastAPI application, built from its parts.

The app holds no logic of its own: routers (`gateway/api/`), the services behind them
(`gateway/serving.py`, `gateway/serving_models.py`), governance and observability, wired here.
All state lives on `app.state`; nothing at module level.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.api.admin_router import admin_router
from gateway.api.anthropic_router import anthropic_router
from gateway.api.openai_router import openai_router
from gateway.api.system_router import system_router
from gateway.api.vllm_router import vllm_router
from gateway.backend import ModelBackend
from gateway.errors import MethodNotAllowed, NotFound, PayloadTooLarge, error_response, shape_of
from gateway.governance.gate import Governance
from gateway.logs import access_logger
from gateway.metrics import GatewayMetrics
from gateway.observe import Observer
from gateway.serving import GenerationService, id_headers, request_id
from gateway.serving_models import ModelCatalog
from gateway.serving_tokens import TokenCountService
from gateway.settings import GatewaySettings
from gateway.tracing import Tracing
from models.registry import Registry
from serve.errors import InvalidRequest, RaygateError, param_from_validation_error

Handler = Callable[[Request], Awaitable[Response]]


class GatewayApp(FastAPI):
    """FastAPI, plus a direct path for the generation routes while the app has no middleware of its own.

    `/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/messages` and `/v1/embeddings` are the hot path: `direct_routes` maps them straight to
    the generation service, skipping Starlette's middleware stack, router and FastAPI's dependency solving
    (about a fifth of the gateway's CPU per request under load; commit 2b5f083, benchmarks/results/overhead).
    The same routes stay registered through the OpenAI router, which the OpenAPI document shows and every
    other request takes. A middleware added to the app (`add_middleware`, `@app.middleware`) turns the
    direct path off, so it sees these routes too (tests/unit/test_gateway_layout.py).
    """

    direct_routes: dict[str, Handler]
    on_error: Callable[[Request, Exception], Response]
    admin_gate: Callable[[str], bool]  # whether a path needs the admin key
    governance: Governance

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root):
            path = path[len(root):]
        admin = self.admin_gate(path)
        if admin or (scope["method"] == "POST" and path.startswith("/ui/")):
            # The admin key is checked before a byte of the body is read, and the body is capped (the console's
            # forms too: their login is the one POST anyone may send).
            request = Request(scope, receive, send)
            try:
                if admin:
                    self.governance.authenticate_admin(request)
                receive = await bounded_body(receive, ADMIN_MAX_BODY_BYTES, request.headers.get("content-length"))
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI envelope
                await self.on_error(request, exc)(scope, receive, send)
                return
        elif scope["method"] == "POST" and not self.user_middleware:
            handler = self.direct_routes.get(path)
            if handler is not None:
                request = Request(scope, receive, send)
                try:
                    response = await handler(request)
                except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI envelope
                    response = self.on_error(request, exc)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


ADMIN_MAX_BODY_BYTES = 1024 * 1024  # an admin body is a key's settings: a long model list fits many times over


async def bounded_body(receive: Any, max_bytes: int, length: str | None) -> Callable[[], Awaitable[Any]]:
    """Read the whole body (413 past `max_bytes`) and return a `receive` that replays it, then waits as the
    original does (for the disconnect)."""
    if length and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
        more = message.get("more_body", False)
    replay: list[Any] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replayed() -> Any:
        return replay.pop() if replay else await receive()

    return replayed


def build_observer(settings: GatewaySettings, tracing: Tracing | None = None) -> Observer:
    """Metrics, traces and the access log as `settings` ask (tracing: the `OTEL_*` environment)."""
    return Observer(
        GatewayMetrics.create() if settings.metrics else None,
        tracing or Tracing.create(settings.tracing),
        access_logger(settings.access_log),
        slo_ttft_s=settings.slo_ttft_s,
        slo_tpot_s=settings.slo_tpot_s,
        metric_key_ids=frozenset(settings.metrics_key_ids),
    )


def create_app(
    settings: GatewaySettings,
    backend: ModelBackend,
    governance: Governance | None = None,
    observer: Observer | None = None,
    registry: Registry | None = None,
) -> GatewayApp:
    """Build the gateway for `backend`'s models (tests pass their own governance and observer)."""
    gov = governance or Governance.build(settings)
    obs = observer or build_observer(settings)
    generation = GenerationService(settings, backend, gov, obs)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await gov.close()  # flushes the usage ledger
            obs.tracing.shutdown()
            if obs.metrics is not None:
                obs.metrics.close()

    app = GatewayApp(title="raygate", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.backend = backend
    app.state.governance = gov
    app.state.observer = obs
    app.state.generation = generation

    def on_error(request: Request, exc: Exception) -> Response:
        rid = request_id(request)
        return error_response(exc, rid, id_headers(request, rid), shape_of(request.url.path))

    async def any_error(request: Request, exc: Exception) -> Response:
        return on_error(request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 400)
        if status == 405:
            err: Exception = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
        elif status == 404:
            err = NotFound(f"Unknown path {request.url.path}.")
        else:
            err = InvalidRequest(str(getattr(exc, "detail", exc)))
        return on_error(request, err)

    async def validation_error(request: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        param = param_from_validation_error(exc)
        message = str(errors[0].get("msg")) if errors else str(exc)
        return on_error(request, InvalidRequest(f"Invalid value for '{param}': {message}" if param else message,
                                                param=param))

    app.add_exception_handler(RaygateError, any_error)  # each carries its status, type and code
    app.add_exception_handler(Exception, any_error)  # anything else: a logged 500 in the envelope
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)

    app.include_router(system_router(backend, obs.metrics))
    app.include_router(openai_router(generation, ModelCatalog(settings, backend)))
    app.include_router(anthropic_router(generation, TokenCountService(generation)))
    app.include_router(vllm_router(generation))
    app.include_router(admin_router(gov))
    if settings.console and gov.has_admin:
        from gateway.console.router import NeedsLogin, console_router, needs_login

        app.include_router(console_router(gov, backend, registry, settings, obs.metrics))
        app.add_exception_handler(NeedsLogin, needs_login)
    app.direct_routes = {
        "/v1/chat/completions": partial(generation.create, "chat"),
        "/v1/completions": partial(generation.create, "completion"),
        "/v1/messages": partial(generation.create, "messages"),
        "/v1/responses": partial(generation.create, "responses"),
        "/v1/embeddings": partial(generation.create, "embeddings"),
    }
    app.on_error = on_error
    app.governance = gov
    metrics_gated = settings.metrics_auth == "admin"
    app.admin_gate = lambda path: path == "/admin" or path.startswith("/admin/") or (
        metrics_gated and path == "/metrics"
    )
    return app
