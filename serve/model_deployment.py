"""A model in a Serve deployment of its own (`placement: deployment`): its engines behind handle calls.

Each replica runs the model's `LiveModel` (so alias following, canary splits and drains
work as they do co-located); the gateway reaches it through `serve.handle_engine`.
Engine errors cross the handle as plain data (`serve.errors.to_wire`), never as a Ray
exception, so their type, param and Retry-After survive. Streams are coalesced: the
first event goes at once, later ones in batches of `STREAM_COALESCE_S`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from models.registry import Registry
from serve.coalesce import coalesce
from serve.config import ModelDeploymentConfig
from serve.engine import Endpoint, Engine, autoscaling_stats, routing_stats, stats_by_version
from serve.errors import EngineError, EngineUnavailable, to_wire
from serve.live import LiveModel
from serve.replica_logs import route_logs_to_serve

Wire = bytes | dict[str, Any]
# A stream's events after the first travel in batches of this window, one Ray message each: one message per token
# cost throughput, and 25 ms coalesced at 64 streams where 10 ms did not (ARCHITECTURE.md's prototype).
STREAM_COALESCE_S = 0.025


class ModelServer:
    """One replica of a model's deployment (wrapped with `serve.deployment` by the builder)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, model: dict[str, Any], registry: str | None = None, cache_dir: str | None = None
    ) -> None:
        route_logs_to_serve(("serve", "models"))
        self.cfg = ModelDeploymentConfig.model_validate(model)
        self.live = LiveModel(self.cfg, Registry(registry, cache_dir=cache_dir) if registry else None)
        await self.live.start()

    def table(self) -> dict[str, Any]:
        """The versions this replica serves now: traffic shares and model cards, by engine key."""
        return {"weights": dict(self.live.weights),
                "cards": {key: e.card.model_dump() for key, e in self.live.engines.items()}}

    def _engine(self, key: int) -> Engine:
        # A gateway's table can lag a roll-out by a poll: a version this replica no longer runs takes its split.
        engine = self.live.engines.get(key)
        return engine if engine is not None and key in self.live.weights else self.live.pick()

    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str, key: int) -> Wire:
        """A full (non-streaming) response, or the engine's error as data."""
        try:
            return await self._engine(key).generate(endpoint, body, request_id)  # type: ignore[return-value]
        except EngineError as exc:
            return to_wire(exc)

    async def stream(self, endpoint: Endpoint, body: dict[str, Any], request_id: str, key: int) -> AsyncIterator[Wire]:
        """A stream's SSE events in coalesced batches; an error (before or after output) as its last item."""
        try:
            result = await self._engine(key).generate(endpoint, body, request_id)
            async for batch in coalesce(result, STREAM_COALESCE_S):  # type: ignore[arg-type]
                yield batch
        except EngineError as exc:
            yield to_wire(exc)

    async def count_prompt_tokens(self, endpoint: Endpoint, body: dict[str, Any], key: int) -> int | None:
        try:
            return await self._engine(key).count_prompt_tokens(endpoint, body)
        except EngineError:
            return None

    async def record_routing_stats(self) -> dict[str, Any]:
        """What this replica tells the gateway's request router (conversation routing passes over busy or KV-full replicas)."""
        return routing_stats(self.live.all_engines())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What this replica's engines tell Serve's autoscaler (serve/autoscaling_policy.py)."""
        return autoscaling_stats(self.live.all_engines())

    async def check_health(self) -> None:
        if not await self.live.readiness():
            raise EngineUnavailable(f"{self.cfg.model}: engine unhealthy")

    async def engine_stats(self) -> dict[str, dict[str, Any]]:
        """Load of each engine by the version it serves (`raygate status`)."""
        return stats_by_version(self.live.all_engines())

    async def __del__(self) -> None:
        await self.live.shutdown()
