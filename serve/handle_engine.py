"""The gateway's side of a model in a deployment of its own (`placement: deployment`).

`HandleModel` mirrors the versions and traffic shares the model's replicas serve (polled
from `ModelServer.table`), so the gateway picks the version of each request itself: the
version label on metrics, usage rows and `x-raygate-model-version` is the one that ran.
Each version is a `HandleEngine`: the engine interface over the deployment handle.
Failures of the handle (no replica, queue full, replica died) map to engine errors the
gateway can fall back on; cancelling a request cancels it in the replica (engine abort).

Where the model routes by conversation (`routing: conversation`), each call carries the request's conversation
key as Serve's session id, and the deployment's request router sends it to the replica whose engine has cached
its prefix (`gateway.routing.replica_router.ConversationRequestRouter`). Where it routes by prefix tree
(`routing: prefix_tree`), each call's body is a `PromptBody`, whose prompt text Ray Serve LLM's
`PrefixCacheAffinityRouter` matches against what it sent to each replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from serve.config import ModelDeploymentConfig
from serve.engine import Endpoint, Engine, EngineResult, EngineStats, InflightLimiter, ModelCard
from serve.errors import EngineError, EngineFailure, EngineOverloaded, EngineUnavailable, from_wire
from serve.live import LiveModel

logger = logging.getLogger(__name__)

NO_LIMIT = 1 << 30  # the deployment's replicas (max_ongoing_requests, queue) bound the load, not the gateway
# The mirror's poll waits this long for a replica to answer. Serve's handle queues a call while its deployment has
# no running replica (its node died, it is restarting) however long that lasts; past this, the model is marked
# unreachable and new requests are refused at once (503, Retry-After) until a replica answers the poll again.
TABLE_TIMEOUT_S = 5.0
RouteKey = Callable[[Mapping[str, Any]], "str | None"]  # a request body's conversation key, None for none


class PromptBody(dict[str, Any]):
    """A request body as Ray Serve LLM's prefix-aware router reads it: that router looks for a call argument with a
    `prompt` attribute. The replica takes it as the dict it is."""

    @property
    def prompt(self) -> str:
        """The prompt as text that only grows with the conversation: the system prompt and the messages (or the
        Responses input, or a completion's prompt) as JSON. Never empty (the router divides by its length)."""
        history = self.get("messages", self.get("input", self.get("prompt")))
        return orjson.dumps([self.get("system"), history], option=orjson.OPT_NON_STR_KEYS).decode()


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

    def __init__(self, handle: Any, key: int, card: ModelCard, route_key: RouteKey | None = None,
                 unreachable: Callable[[], str | None] = lambda: None, prompt_routed: bool = False) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._route_key = route_key
        self._prompt_routed = prompt_routed
        self._unreachable = unreachable
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
            return await self._handle.count_prompt_tokens.remote(endpoint, self._routed(body), self.key)
        except Exception:  # noqa: BLE001 - the caller estimates instead
            return None

    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        if (why := self._unreachable()) is not None:
            raise EngineUnavailable(f"{self._card.id}: the model's deployment has no replica answering ({why})")
        return await self._inflight.admit(lambda: self._call(endpoint, body, request_id))

    def _routed(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body as the deployment's router reads it."""
        return PromptBody(body) if self._prompt_routed else body

    def _handle_for(self, body: dict[str, Any]) -> Any:
        """The handle for this request (streaming or not), with its conversation key as Serve's session id."""
        handle = self._stream if body.get("stream") else self._handle
        session = self._route_key(body) if self._route_key is not None else None
        return handle.options(session_id=session) if session else handle

    async def _call(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        handle = self._handle_for(body)
        body = self._routed(body)
        if body.get("stream"):
            return self._relay(handle.stream.remote(endpoint, body, request_id, self.key))
        response = handle.generate.remote(endpoint, body, request_id, self.key)
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

    def __init__(self, cfg: ModelDeploymentConfig, handle: Any, route_key: RouteKey | None = None) -> None:
        super().__init__(cfg)
        self.handle = handle
        self.route_key = route_key
        self.unreachable: str | None = None  # why the last poll got no answer from a replica; None once one answers

    @property
    def following(self) -> bool:
        return True  # the mirror is refreshed whatever the replicas follow

    async def start(self) -> None:
        await self.sync(initial=True)
        assert self.cfg is not None
        self._task = asyncio.create_task(self._poll(self.cfg.registry_poll_s))

    async def sync(self, initial: bool = False) -> bool:
        """Mirror the replicas' versions and shares; True if traffic moved."""
        response = self.handle.table.remote()
        try:  # at start, as long as the deployment takes to start its engines (the gateway is not ready before)
            table = await asyncio.wait_for(response, None if initial else TABLE_TIMEOUT_S)
        except Exception as exc:
            response.cancel()
            self.unreachable = f"no answer in {TABLE_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) \
                else type(exc).__name__
            raise EngineUnavailable(f"{self.handle.deployment_name}: {self.unreachable}") from None
        self.unreachable = None
        cards = {int(k): ModelCard.model_validate(c) for k, c in table["cards"].items()}
        engines: dict[int, Engine] = {}
        for key, card in cards.items():
            engine = self.engines.get(key)
            if isinstance(engine, HandleEngine):
                engine.card = card
            else:
                engine = HandleEngine(self.handle, key, card, self.route_key, lambda: self.unreachable,
                                      prompt_routed=self.cfg is not None and self.cfg.routing == "prefix_tree")
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
