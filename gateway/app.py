"""`create_app(settings, backend)`: the FastAPI application of the gateway."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from gateway import service
from gateway.admin import admin_router
from gateway.backend import ModelBackend
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, error_response, spec_for
from gateway.governance.gate import Governance, Outcome
from gateway.governance.quota_policy import unreported_usage
from gateway.governance.records import KeyRecord
from gateway.governance.routing import plan, priority_for
from gateway.logs import REQUEST_ID, access_logger
from gateway.metrics import GatewayMetrics
from gateway.observe import Observer
from gateway.settings import GatewaySettings
from gateway.tracing import Tracing, attach_trace, detach_trace
from serve.engine import Endpoint, ModelCard
from serve.errors import EngineError, InvalidRequest, ModelNotFound

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": {"application/json": {}}}
    for code, desc in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        403: "The key may not use this model",
        404: "Unknown model",
        429: "Rate limit or budget exceeded (Retry-After, x-ratelimit-*)",
        503: "Engine overloaded or unavailable (Retry-After)",
    }.items()
}


class SettleAfterResponse(Response):
    """Runs its background task (the quota settlement) even when sending the body fails."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task, self.background = self.background, None
        try:
            await super().__call__(scope, receive, send)
        finally:
            if task is not None:
                await task()


Handler = Callable[[Request], Awaitable[Response]]


class GatewayApp(FastAPI):
    """FastAPI, plus a direct path for the generation routes.

    The OpenAI POST routes are the hot path: they skip Starlette's middleware stack, router
    and FastAPI's dependency solving (about a fifth of the gateway's CPU per request under
    load, see benchmarks/results/overhead) and go straight to their handler. They stay
    registered as FastAPI routes too, for the OpenAPI schema.
    """

    fast_routes: dict[str, Handler]
    on_error: Callable[[Request, Exception], Response]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path")
            if root and path.startswith(root):
                path = path[len(root):]
            handler = self.fast_routes.get(path)
            if handler is not None:
                request = Request(scope, receive, send)
                try:
                    response = await handler(request)
                except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI envelope
                    response = self.on_error(request, exc)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _request_id(request: Request) -> str:
    """The caller's (or Serve's) `x-request-id`, else a new one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return rid


def _id_headers(request: Request, rid: str) -> dict[str, str]:
    # Serve echoes an incoming x-request-id itself; set it only when nobody else will.
    return {} if "x-request-id" in request.headers else {"x-request-id": rid}


def build_observer(settings: GatewaySettings, tracing: Tracing | None = None) -> Observer:
    """Metrics, traces and the access log as `settings` ask (tracing: the `OTEL_*` environment)."""
    return Observer(
        GatewayMetrics.create() if settings.metrics else None,
        tracing or Tracing.create(settings.tracing),
        access_logger(settings.access_log),
        slo_ttft_s=settings.slo_ttft_s,
        slo_tpot_s=settings.slo_tpot_s,
    )


def create_app(
    settings: GatewaySettings,
    backend: ModelBackend,
    governance: Governance | None = None,
    observer: Observer | None = None,
) -> FastAPI:
    """Build the gateway; all state lives on `app.state`, nothing at module level."""
    gov = governance or Governance.build(settings)
    obs = observer or build_observer(settings)

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

    async def authenticate(request: Request) -> KeyRecord:  # async: no thread-pool hop per request
        return await gov.authenticate(request)

    caller_dep = Depends(authenticate)

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

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        if obs.metrics is None:
            raise NotFound("Metrics are off (settings.metrics).")
        body, content_type = obs.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/ready")
    async def ready() -> Response:
        states = await backend.readiness()
        ok = bool(states) and all(states.values())
        body = {"status": "ready" if ok else "not_ready", "models": states}
        return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    def route_card(name: str) -> ModelCard:
        """A route as `/v1/models` shows it: its first target's card under the route's name."""
        return backend.resolve(settings.routes[name].targets[0].model).card.model_copy(update={"id": name})

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(caller: KeyRecord = caller_dep) -> Response:
        # A key sees the models and routes it may call, nothing else.
        cards = [c for c in backend.cards() if caller.may_use(c.id, c.root or "")]
        cards += [route_card(name) for name in settings.routes if caller.may_use(name)]
        data = [c.model_dump(exclude_none=True) for c in cards]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def get_model(model_id: str, caller: KeyRecord = caller_dep) -> Response:
        card = route_card(model_id) if model_id in settings.routes else backend.resolve(model_id).card
        if not caller.may_use(model_id, card.id):
            raise ModelNotFound(model_id)  # as OpenAI answers for a model the key cannot access
        return Response(orjson.dumps(card.model_dump(exclude_none=True)), media_type="application/json")

    exact_prompts = settings.prompt_token_count == "engine"

    def targets(model: str) -> list[str]:
        route = settings.routes.get(model)
        if route is None:
            return [model]
        return plan(route, random.random(), settings.max_route_attempts)

    async def run(endpoint: Endpoint, request: Request) -> Response:
        rid = _request_id(request)
        REQUEST_ID.set(rid)
        watch = obs.start(request.scope, request.headers, rid)
        adm = None
        try:
            caller = watch.caller = await gov.authenticate(request)
            watch.mark("auth")
            body = await service.read_json(request, settings.max_request_bytes)
            service.validate(endpoint, body)
            requested = watch.model = body["model"]
            chosen = targets(requested)
            first = backend.resolve(chosen[0])  # 404 for an unknown model, before any quota
            card = first.card
            gov.authorize(caller, requested, card.id)
            watch.mark("routing")
            if card.scheduling == "priority":
                body["priority"] = priority_for(caller.tier, settings.tier_priority)
            count = (lambda: first.count_prompt_tokens(endpoint, body)) if exact_prompts else None
            adm = await gov.admit(caller, body, card.max_model_len, count)
            watch.mark("quota")
        except BaseException as exc:
            watch.fail(exc)
            raise
        streaming = bool(body.get("stream"))
        watch.admitted(streaming, adm.unchecked)
        outcome = Outcome(model=requested)
        headers = {**_id_headers(request, rid), **adm.headers}
        client_wants_usage = service.want_usage(body) if streaming else True

        async def done(error: BaseException | None = None) -> None:
            watch.end(outcome, error)
            await gov.finish(caller, adm, outcome, rid, time.perf_counter() - watch.t0)

        try:
            # Only an engine that forwards requests reads the current trace (to send `traceparent` on).
            forwards = first.forwards_trace_context or len(chosen) > 1
            trace_token = attach_trace(watch.span) if forwards else None
            try:
                result, engine, fallbacks = await service.generate(
                    backend, first, chosen, endpoint, body, rid, request, settings.request_timeout_s
                )
            finally:
                detach_trace(trace_token)
        except BaseException as exc:
            outcome.status = 499 if isinstance(exc, service.ClientDisconnected) else spec_for(exc).status
            await done(exc)
            if isinstance(exc, service.ClientDisconnected):
                return Response(status_code=499)
            if isinstance(exc, GatewayError | EngineError):
                exc.headers = {**adm.headers, **getattr(exc, "headers", {})}  # type: ignore[union-attr]
            raise
        watch.first_output(engine.card.id, fallbacks)
        outcome.version = engine.card.root
        if engine.card.root:
            headers["x-raygate-model-version"] = engine.card.root
        if isinstance(result, bytes):
            service.read_usage(result, outcome)
            # Settle after the body is on its way: the client does not wait for the quota store.
            return SettleAfterResponse(
                result, media_type="application/json", headers=headers, background=BackgroundTask(done)
            )

        async def finish(client_left: bool) -> None:
            if client_left:
                outcome.status = 499
            if not outcome.usage_seen:  # cut short: charge what was sent, not nothing
                outcome.prompt_tokens, outcome.completion_tokens = unreported_usage(
                    body, outcome.events, endpoint == "chat"
                )
            await done()

        events = service.relay(result, outcome, client_wants_usage, rid, finish)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
        )

    stream_ok: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}

    # Registered for the OpenAPI schema; requests take the fast path (GatewayApp.__call__) to `run`.
    @app.post("/v1/chat/completions", responses={**stream_ok, **ERROR_RESPONSES})
    async def chat_completions(request: Request) -> Response:
        return await run("chat", request)

    @app.post("/v1/completions", responses={**stream_ok, **ERROR_RESPONSES})
    async def completions(request: Request) -> Response:
        return await run("completion", request)

    async def fast_chat(request: Request) -> Response:
        return await run("chat", request)

    async def fast_completion(request: Request) -> Response:
        return await run("completion", request)

    app.fast_routes = {"/v1/chat/completions": fast_chat, "/v1/completions": fast_completion}
    app.on_error = _error

    app.include_router(admin_router(gov))

    return app
