"""Conversation routing across gateway replicas, on Serve's request-router API.

Two pieces, wired by `gateway.builder` when `gateway.conversation_routing.enabled`:

- `ConversationRequestRouter`, the gateway deployment's Serve request router: ranks replicas
  for a request's conversation key (`RequestMetadata.session_id`) with the pure policy in
  `gateway.routing.affinity`, using the in-flight counts and KV cache use replicas report
  (`GatewayIngress.record_routing_stats`, `ModelReplica.record_routing_stats`). Serve's Python proxy and handles use it directly
  (the key is then the `x-session-id` header only).
- `ConversationRouter`, the ingress request router HAProxy asks before it forwards a POST
  (Ray's direct-ingress contract: `POST /internal/route` with the request's body, answered
  with the chosen `replica_id`). It derives the key from the body (`prompt_cache_key`, the
  session header, or the conversation's opening) and lets the request router pick.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from ray import serve
from ray.serve._private.constants import SERVE_SESSION_ID
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.routing.affinity import conversation_key, rank_replicas
from serve.autoscaling_policy import KV_CACHE_USAGE_STAT
from serve.engine import IN_FLIGHT_STAT

logger = logging.getLogger(__name__)


class ConversationRequestRouter(RequestRouter):
    """Replicas ranked by the request's conversation key, busy or KV-full ones passed over (see `rank_replicas`)."""

    def initialize_state(self, max_load_gap: int = 16, max_kv_cache_usage: float | None = None, **_: Any) -> None:
        self.max_load_gap = max_load_gap
        self.max_kv_cache_usage = max_kv_cache_usage

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        meta = pending_request.metadata if pending_request is not None else None
        # No key: the request id spreads such requests evenly (still away from busy replicas).
        key = (meta.session_id or meta.internal_request_id) if meta is not None else ""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        stats = {rid: r.routing_stats or {} for rid, r in by_id.items()}
        loads = {rid: int(s.get(IN_FLIGHT_STAT, 0)) for rid, s in stats.items()}
        kv = {rid: float(s.get(KV_CACHE_USAGE_STAT, 0.0)) for rid, s in stats.items()}
        # One replica per rank: Serve tries them in this order when it reserves capacity.
        return [[by_id[rid]] for rid in rank_replicas(key, loads, self.max_load_gap, kv, self.max_kv_cache_usage)]


def _body(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:  # cut short by HAProxy's buffer, or not JSON: no key, load decides
        return None
    return doc if isinstance(doc, dict) else None


@serve.ingress()
class ConversationRouter:
    """HAProxy's ingress request router for the gateway: picks the replica for each POST."""

    def __init__(self, gateway: DeploymentHandle) -> None:
        self.gateway = gateway

    def __serve_build_asgi_app__(self) -> Any:
        return Starlette(routes=[
            Route("/internal/route", self.route, methods=["POST"]),
            Route("/health", lambda _: Response(b"ok"), methods=["GET"]),
        ])

    async def route(self, request: Request) -> Response:
        try:
            replica_id = await pick_replica(self.gateway, await request.body(), request.headers.get(SERVE_SESSION_ID))
        except Exception as exc:  # noqa: BLE001 - any non-200 makes HAProxy answer 503 for this request
            logger.warning("conversation routing failed: %s", exc)
            return JSONResponse({"detail": str(exc)}, status_code=503)
        return JSONResponse({"replica_id": replica_id})


async def pick_replica(gateway: DeploymentHandle, body: bytes, session: str | None) -> str:
    """The full id of the gateway replica for a request (as HAProxy's replica map names it)."""
    key = conversation_key(_body(body), session)
    handle = gateway.options(session_id=key) if key else gateway
    # Pick only: HAProxy sends the request itself, so no capacity is held on the replica here.
    async with handle.choose_replica(_reserve=False) as selection:
        return str(selection._replica.replica_id.to_full_id_str())
