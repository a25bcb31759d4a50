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
from starlette.responses import Response

from gateway.backend import ModelBackend
from gateway.dispatch import ClientDisconnected, generate
from gateway.errors import RequestTimeout, status_of
from gateway.governance.gate import Governance, Outcome
from gateway.governance.quota_policy import reservation, unreported_usage
from gateway.governance.records import KeyRecord
from gateway.logs import REQUEST_ID
from gateway.observe import Observer
from gateway.protocol import GenerationRequest, ensure_shallow, read_json, validate
from gateway.routing.routes import plan, priority_for
from gateway.settings import GatewaySettings
from gateway.streaming import WIRES, SettleAfterResponse, SettledStream, relay
from gateway.tracing import attach_trace, detach_trace
from serve.engine import SCHEDULED, Endpoint, Engine
from serve.errors import ModelNotFound, RaygateError

CLIENT_ID_HEADERS = ("x-client-request-id", "x-request-id")
_CLIENT_ID_MAX = 128


def request_id(request: Request) -> str:
    """This request's id, always ours: the engine, the ledger and traces use it (two clients sending the same
    `x-request-id` must not collide in the engine, nor a long one break the ledger)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = uuid.uuid4().hex
    return rid


def client_request_id(request: Request) -> str | None:
    """The caller's own id for the request (OpenAI's `X-Client-Request-Id`, else `x-request-id`), bounded and
    reduced to printable ASCII: a correlation field for the access log, never an id we rely on."""
    for name in CLIENT_ID_HEADERS:
        value = request.headers.get(name)
        if value:
            return "".join(c for c in value[:_CLIENT_ID_MAX] if c.isascii() and c.isprintable()) or None
    return None


def id_headers(request: Request, rid: str) -> dict[str, str]:
    """Our id in `x-request-id`, unless the caller sent one: Serve's ingress (and a listening replica) echo the
    caller's there, so ours would be overwritten."""
    return {} if "x-request-id" in request.headers else {"x-request-id": rid}


class GenerationService:
    """Every request that names a model (generation, embeddings, tokenize), for every engine behind `backend`."""

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

    async def resolve(self, caller: KeyRecord, requested: str) -> tuple[Engine, list[str]]:
        """The engine of the first target the key may use and every target it may try, or ModelNotFound (an
        unknown model and one the key may not use look the same, and both count against its rpm)."""
        try:
            chosen = self.gov.authorize(
                caller, requested, self.targets(requested), self.backend.grant_names, requested in self.settings.routes
            )
            return self.backend.resolve(chosen[0]), chosen
        except ModelNotFound:
            await self.gov.count_request(caller)
            raise ModelNotFound(requested) from None

    async def create(self, endpoint: Endpoint, request: Request, typed: GenerationRequest | None = None) -> Response:
        """Answer one generation request (a full body or an SSE stream); errors raise for the app's envelope.

        `typed`: the body already validated (FastAPI's route did it), not validated again.
        """
        gov, settings = self.gov, self.settings
        rid = request_id(request)
        REQUEST_ID.set(rid)
        watch = self.obs.start(request.scope, request.headers, rid)
        watch.endpoint = endpoint
        watch.client_request_id = client_request_id(request)
        try:
            caller = watch.caller = await gov.authenticate(request)
            await gov.authorize_endpoint(caller, endpoint)
            watch.mark("auth")
            parsed = typed is not None  # FastAPI's path parsed and validated the body itself
            if typed is None:
                typed = validate(endpoint, await read_json(request, settings.max_request_bytes))
            body = typed.engine_body()  # what the engine runs is what was validated
            if parsed:
                ensure_shallow(body)
            requested = typed.model
            first, chosen = await self.resolve(caller, requested)
            watch.model = requested  # a metric label: only names the gateway serves, never any string a client sends
            card = first.card
            watch.mark("routing")
            if card.scheduling == "priority" and endpoint in SCHEDULED:
                body["priority"] = priority_for(caller.tier, settings.tier_priority)
            exact = self.exact_prompts and endpoint in SCHEDULED  # tokenize and detokenize reserve nothing
            count = (lambda: first.count_prompt_tokens(endpoint, body)) if exact else None
            adm = await gov.admit(caller, typed.demand, card.max_model_len, count, price=lambda: gov.prices.ceiling(
                name for target in chosen for name in self.backend.grant_names(target)))
            watch.mark("quota")
        except BaseException as exc:
            watch.fail(exc)
            raise
        streaming = typed.streams
        wire = WIRES[endpoint]
        watch.admitted(streaming, adm.unchecked)
        outcome = Outcome(model=requested, endpoint=endpoint, end_user=typed.end_user())
        headers = {**id_headers(request, rid), **adm.headers}
        client_wants_usage = wire.want_usage(body) if streaming else True

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
            if isinstance(exc, ClientDisconnected | RequestTimeout):
                # Cancelled in the engine before its full body: no engine reports what it had made by then,
                # so the request is charged the most it could have (its reservation's bound), never nothing.
                demand = typed.demand()
                outcome.prompt_tokens = demand.prompt_tokens
                outcome.completion_tokens = reservation(demand, card.max_model_len) - demand.prompt_tokens
            await done(exc)
            if isinstance(exc, ClientDisconnected):
                return Response(status_code=499)
            if isinstance(exc, RaygateError):
                exc.headers = {**adm.headers, **getattr(exc, "headers", {})}  # type: ignore[attr-defined]
            raise
        watch.first_output(engine.card.id, fallbacks)
        outcome.version, outcome.served = engine.card.root, engine.card.id
        if engine.card.root:
            headers["x-raygate-model-version"] = engine.card.root
        if isinstance(result, bytes):
            wire.read_usage(result, outcome)
            # Settle after the body is on its way: the client does not wait for the quota store.
            return SettleAfterResponse(
                result, media_type="application/json", headers=headers, background=BackgroundTask(done)
            )

        finished = False

        async def finish(client_left: bool) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            if client_left:
                outcome.status = 499
            if not outcome.usage_seen:  # cut short: charge what was sent, not nothing
                outcome.prompt_tokens, outcome.completion_tokens = unreported_usage(
                    typed.demand(), outcome.events, wire.opens_with_role
                )
            await done()

        async def close_unsent() -> None:
            """The client left before the body started: the engine's first event was made, and is charged."""
            if not finished:
                if not outcome.events:
                    wire.observe(result.head, outcome, client_wants_usage)
                try:
                    await result.aclose()
                finally:
                    await finish(True)

        events = relay(result, outcome, client_wants_usage, rid, finish, wire)
        return SettledStream(
            events, close_unsent, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
        )
