"""The gateway's side of a model in a deployment of its own (`placement: deployment`).

`HandleModel` mirrors the versions and traffic shares the model's replicas serve (polled
from `ModelServer.table`), so the gateway picks the version of each request itself: the
version label on metrics, usage rows and `x-raygate-model-version` is the one that ran.
Each version is a `HandleEngine`: the engine interface over the deployment handle.
Failures of the handle (no replica, queue full, replica died) map to engine errors the
gateway can fall back on; cancelling a request cancels it in the replica (engine abort).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from serve.config import ModelDeploymentConfig
from serve.engine import Endpoint, Engine, EngineResult, EngineStats, InflightLimiter, ModelCard
from serve.errors import EngineError, EngineFailure, EngineOverloaded, EngineUnavailable, from_wire
from serve.live import LiveModel

logger = logging.getLogger(__name__)

NO_LIMIT = 1 << 30  # the deployment's replicas (max_ongoing_requests, queue) bound the load, not the gateway


def handle_error(exc: BaseException, started: bool = False) -> EngineError:
    """The engine error for a failed handle call (before or after a stream's first output)."""
    from ray.serve.exceptions import BackPressureError

    name = type(exc).__name__
    if isinstance(exc, BackPressureError):
        return EngineOverloaded("The model's deployment is at its queue limit; retry later.")
    if started:
        return EngineFailure(f"the model's replica broke off the stream ({name})")
    return EngineUnavailable(f"the model's deployment did not answer ({name})")


class HandleEngine(Engine):
    """One version of a model served by its own deployment, reached through a Serve handle."""

    def __init__(self, handle: Any, key: int, card: ModelCard) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)
        self.key = key
        self._card = card
        self._inflight = InflightLimiter(NO_LIMIT)

    @property
    def card(self) -> ModelCard:
        return self._card

    @card.setter
    def card(self, card: ModelCard) -> None:
        self._card = card

    async def start(self) -> None:
        """The deployment started it."""

    async def check_health(self) -> None:
        try:
            await self._handle.check_health.remote()
        except Exception as exc:  # noqa: BLE001 - any failure of the call: not healthy
            raise EngineUnavailable(f"{self._card.id}: deployment unhealthy ({type(exc).__name__})") from None

    def stats(self) -> EngineStats:
        return EngineStats(running=self._inflight.count, admitted=self._inflight.count)

    async def count_prompt_tokens(self, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        try:
            return await self._handle.count_prompt_tokens.remote(endpoint, body, self.key)
        except Exception:  # noqa: BLE001 - the caller estimates instead
            return None

    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        return await self._inflight.admit(lambda: self._call(endpoint, body, request_id))

    async def _call(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        if body.get("stream"):
            return self._relay(self._stream.stream.remote(endpoint, body, request_id, self.key))
        response = self._handle.generate.remote(endpoint, body, request_id, self.key)
        try:
            out = await response
        except asyncio.CancelledError:
            response.cancel()  # the client left: abort it in the replica's engine
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to what the gateway can act on
            raise handle_error(exc) from None
        if isinstance(out, dict):
            raise from_wire(out)
        return out

    async def _relay(self, stream: Any) -> AsyncIterator[bytes]:
        started = finished = False
        try:
            async for item in stream:
                if isinstance(item, dict):
                    raise from_wire(item)
                started = True
                yield item
            finished = True
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise handle_error(exc, started) from None
        finally:
            if not finished:
                stream.cancel()  # closed early or failed: stop generating in the replica


class HandleModel(LiveModel):
    """A model id whose engines run in its own deployment: the versions and shares mirrored, one engine per version."""

    in_process = False  # its replicas have health checks of their own

    def __init__(self, cfg: ModelDeploymentConfig, handle: Any) -> None:
        super().__init__(cfg)
        self.handle = handle

    @property
    def following(self) -> bool:
        return True  # the mirror is refreshed whatever the replicas follow

    async def start(self) -> None:
        await self.sync(initial=True)
        assert self.cfg is not None
        self._task = asyncio.create_task(self._poll(self.cfg.registry_poll_s))

    async def sync(self, initial: bool = False) -> bool:
        """Mirror the replicas' versions and shares; True if traffic moved."""
        table = await self.handle.table.remote()
        cards = {int(k): ModelCard.model_validate(c) for k, c in table["cards"].items()}
        engines: dict[int, Engine] = {}
        for key, card in cards.items():
            engine = self.engines.get(key)
            if isinstance(engine, HandleEngine):
                engine.card = card
            else:
                engine = HandleEngine(self.handle, key, card)
            engines[key] = engine
        weights = {int(k): float(w) for k, w in table["weights"].items() if int(k) in engines}
        if not weights:
            raise EngineUnavailable(f"{self.handle.deployment_name}: the deployment serves no version")
        moved = weights != self.weights
        self.engines, self.weights = engines, weights  # one step: the next request sees the new split
        if moved and not initial:
            logger.warning("%s: deployment now serves %s", self.handle.deployment_name,
                           ", ".join(f"{cards[k].root} {w:g}%" for k, w in sorted(weights.items())))
        return moved

    async def shutdown(self) -> None:
        """Stop mirroring; the deployment's engines belong to its replicas."""
        await self.stop_polling()
