"""`/health`, `/ready` and `/metrics`: for load balancers, orchestrators and Prometheus (no user key; `/metrics` asks for
the admin key unless `metrics_auth: open`)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from gateway.backend import ModelBackend
from gateway.errors import NotFound
from gateway.metrics import GatewayMetrics


def system_router(backend: ModelBackend, metrics: GatewayMetrics | None) -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @r.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        if metrics is None:
            raise NotFound("Metrics are off (settings.metrics).")
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @r.get("/ready")
    async def ready() -> Response:
        states = await backend.readiness()
        ok = bool(states) and all(states.values())
        body = {"status": "ready" if ok else "not_ready", "models": states}
        return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    return r
