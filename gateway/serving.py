"""The generation service: one request's path through the gateway, with no HTTP routing in it.

auth → validate → route → authorize → admit → dispatch → relay → settle. The routes of
`gateway/api/openai_router.py` and the app's direct path (`gateway/app.py`) both call
`GenerationService.create`; tests call it with a Starlette `Request` built from a scope.
"""

from __future__ import annotations

import random
import time
import uuid

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.backend import ModelBackend
from gateway.dispatch import ClientDisconnected, generate
from gateway.errors import status_of
from gateway.governance.gate import Governance, Outcome
from gateway.governance.quota_policy import unreported_usage
from gateway.logs import REQUEST_ID
from gateway.observe import Observer
from gateway.protocol import GenerationRequest, read_json, validate
from gateway.routing.routes import plan, priority_for
from gateway.settings import GatewaySettings
from gateway.streaming import SettleAfterResponse, read_usage, relay, want_usage
from gateway.tracing import attach_trace, detach_trace
from serve.engine import Endpoint
from serve.errors import RaygateError


def request_id(request: Request) -> str:
    """The caller's (or Serve's) `x-request-id`, else a new one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return rid


def id_headers(request: Request, rid: str) -> dict[str, str]:
    """Serve echoes an incoming x-request-id itself; set it only when nobody else will."""
    return {} if "x-request-id" in request.headers else {"x-request-id": rid}


class GenerationService:
    """Chat and text completions, for every engine behind `backend`."""

    def __init__(
        self, settings: GatewaySettings, backend: ModelBackend, governance: Governance, observer: Observer
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.gov = governance
        self.obs = observer
        self.exact_prompts = settings.prompt_token_count == "engine"

    def targets(self, model: str) -> list[str]:
        """The models a request for `model` tries, in order: itself, or its route's plan."""
        route = self.settings.routes.get(model)
        if route is None:
            return [model]
        return plan(route, random.random(), self.settings.max_route_attempts)

    async def create(self, endpoint: Endpoint, request: Request, typed: GenerationRequest | None = None) -> Response:
        """Answer one generation request (a full body or an SSE stream); errors raise for the app's envelope.

        `typed`: the body already validated (FastAPI's route did it), not validated again.
        """
        gov, settings = self.gov, self.settings
        rid = request_id(request)
        REQUEST_ID.set(rid)
        watch = self.obs.start(request.scope, request.headers, rid)
        try:
            caller = watch.caller = await gov.authenticate(request)
            watch.mark("auth")
            body = await read_json(request, settings.max_request_bytes)
            if typed is None:
                typed = validate(endpoint, body)
            requested = watch.model = typed.model
            chosen = self.targets(requested)
            first = self.backend.resolve(chosen[0])  # 404 for an unknown model, before any quota
            card = first.card
            gov.authorize(caller, requested, card.id)
            watch.mark("routing")
            if card.scheduling == "priority":
                body["priority"] = priority_for(caller.tier, settings.tier_priority)
            count = (lambda: first.count_prompt_tokens(endpoint, body)) if self.exact_prompts else None
            adm = await gov.admit(caller, body, card.max_model_len, count)
            watch.mark("quota")
        except BaseException as exc:
            watch.fail(exc)
            raise
        streaming = bool(typed.stream)
        watch.admitted(streaming, adm.unchecked)
        outcome = Outcome(model=requested)
        headers = {**id_headers(request, rid), **adm.headers}
        client_wants_usage = want_usage(body) if streaming else True

        async def done(error: BaseException | None = None) -> None:
            watch.end(outcome, error)
            await gov.finish(caller, adm, outcome, rid, time.perf_counter() - watch.t0)

        try:
            # Only an engine that forwards requests reads the current trace (to send `traceparent` on).
            forwards = first.forwards_trace_context or len(chosen) > 1
            trace_token = attach_trace(watch.span) if forwards else None
            try:
                result, engine, fallbacks = await generate(
                    self.backend, first, chosen, endpoint, body, rid, request, settings.request_timeout_s
                )
            finally:
                detach_trace(trace_token)
        except BaseException as exc:
            outcome.status = 499 if isinstance(exc, ClientDisconnected) else status_of(exc)
            await done(exc)
            if isinstance(exc, ClientDisconnected):
                return Response(status_code=499)
            if isinstance(exc, RaygateError):
                exc.headers = {**adm.headers, **getattr(exc, "headers", {})}  # type: ignore[attr-defined]
            raise
        watch.first_output(engine.card.id, fallbacks)
        outcome.version = engine.card.root
        if engine.card.root:
            headers["x-raygate-model-version"] = engine.card.root
        if isinstance(result, bytes):
            read_usage(result, outcome)
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

        events = relay(result, outcome, client_wants_usage, rid, finish)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
        )
