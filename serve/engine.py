"""The one engine interface every implementation (vLLM, fake, remote handle) follows.

An engine takes a request body of one endpoint (OpenAI's chat or text completion,
Responses or embeddings, Anthropic's Messages, vLLM's tokenize and detokenize; already
validated by the gateway) and returns either the full JSON response as bytes or an async
iterator of SSE events (bytes, each ending in a blank line: ``data: ...`` for chat and
completions, the last one ``data: [DONE]``; named ``event: ...\ndata: ...`` events for
Responses and Messages, as those APIs stream). Errors
are raised as ``serve.errors.EngineError`` subclasses; an iterator may raise one after it started.
Cancelling the awaiting task (or closing the iterator) aborts the request in the engine.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Literal

from pydantic import BaseModel, Field

from serve.autoscaling_policy import KV_CACHE_USAGE_STAT

# messages: Anthropic's Messages API; embeddings: OpenAI's, from a pooling model; tokenize, detokenize: vLLM's.
Endpoint = Literal["chat", "completion", "messages", "responses", "embeddings", "tokenize", "detokenize"]
# Endpoints whose requests an engine schedules (and so take a priority); tokenize and detokenize run no model.
SCHEDULED: frozenset[Endpoint] = frozenset({"chat", "completion", "messages", "responses", "embeddings"})
EngineResult = bytes | AsyncIterator[bytes]


class ModelCard(BaseModel):
    """What `/v1/models` says about a served model."""

    id: str = Field(description="The model id clients send in `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the version was published.")
    owned_by: str = Field(default="raygate", description="Owner shown to clients.")
    root: str | None = Field(default=None, description="Registry reference `name@version` actually served.")
    max_model_len: int | None = Field(default=None, description="Context length in tokens.")
    engine: str | None = Field(default=None, description="Engine implementation (vllm, fake, remote).")
    dtype: str | None = Field(default=None, description="Compute dtype the engine runs the weights in.")
    scheduling: str | None = Field(
        default=None, description="Request scheduling (`priority`: the gateway maps key tiers to priorities)."
    )
    variant: str | None = Field(default=None, description="Weight variant served (full, int8-w8a8, bnb-8bit...).")
    quantization: str | None = Field(default=None, description="Quantization of the served weights, if any.")
    parent: str | None = Field(default=None, description="For a LoRA adapter: the base model id it runs on.")


class EngineStats(BaseModel):
    """A point-in-time view of an engine's load."""

    running: int = Field(description="Requests the engine holds and has not finished (waiting or generating).")
    admitted: int = Field(default=0, description="Requests accepted and whose response has not ended yet.")
    healthy: bool = Field(default=True, description="Whether the last health check passed.")
    waiting: int = Field(default=0, description="Requests the engine's scheduler holds waiting to run (its batch or "
                         "KV cache full), as of its last step; 0 for engines that do not report it.")
    kv_cache_usage: float = Field(default=0.0, description="Share of the engine's KV cache in use (0-1), as of its "
                                  "last step; 0 for engines that do not report it.")


class Engine(abc.ABC):
    """A text-generation engine behind the OpenAI API."""

    # True for engines that pass requests to another server and send it the current trace context.
    forwards_trace_context: bool = False

    @property
    @abc.abstractmethod
    def card(self) -> ModelCard:
        """The model card of the served model (valid after `start`)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns when the engine accepts requests."""

    @abc.abstractmethod
    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        """Run one request of `endpoint` (see the module docstring)."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise EngineUnavailable if the engine cannot serve."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""

    async def count_prompt_tokens(self, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        """The prompt's length in tokens as this engine will see it (chat template included), or None.

        None: the engine cannot tell (an upstream API), or the request is one it will refuse
        anyway; callers fall back to an estimate.
        """
        return None

    def busy(self) -> int:
        """Requests still in flight (what a drain waits for)."""
        s = self.stats()
        return max(s.running, s.admitted)

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at `path` as model id `name` (engines with LoRA support only)."""
        raise NotImplementedError(f"{type(self).__name__} does not serve LoRA adapters")

    async def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name`."""
        raise NotImplementedError(f"{type(self).__name__} does not serve LoRA adapters")


# The routing stats a replica reports to Serve's request routers (`record_routing_stats`): requests in flight in
# its engines, and its fullest KV cache (KV_CACHE_USAGE_STAT). Conversation routing passes over a replica carrying
# too many more requests than the least busy one, or whose KV cache is nearly full.
IN_FLIGHT_STAT = "in_flight"


def routing_stats(engines: Iterable[Engine]) -> dict[str, float]:
    """What a replica hosting `engines` tells Serve's request routers."""
    engines = list(engines)
    return {IN_FLIGHT_STAT: sum(e.busy() for e in engines), **autoscaling_stats(engines)}


def autoscaling_stats(engines: Iterable[Engine]) -> dict[str, float]:
    """What a replica hosting `engines` reports to Serve's autoscaler (`record_autoscaling_stats`), beside the
    requests in flight Serve counts itself: its fullest KV cache (serve/autoscaling_policy.py)."""
    return {KV_CACHE_USAGE_STAT: max((e.stats().kv_cache_usage for e in engines), default=0.0)}


def stats_by_version(engines: Iterable[Engine]) -> dict[str, dict[str, Any]]:
    """Each engine's load and what it serves, by its version's reference (`raygate status` prints this); a model
    served under a name of its own (`served_name`) as `<name> (<version>)`, so two of one version stay apart."""
    return {_version_key(e.card): {**e.stats().model_dump(), "model": e.card.id, "variant": e.card.variant}
            for e in engines}


def _version_key(card: ModelCard) -> str:
    if not card.root:
        return card.id
    return card.root if card.root.rsplit("@", 1)[0] == card.id else f"{card.id} ({card.root})"


class InflightLimiter:
    """Exact admission: counts requests from acceptance to the end of their response.

    Checked and incremented synchronously, so concurrent arrivals cannot all pass a
    check before any of them is counted (the engine itself registers requests later).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def acquire(self) -> None:
        from serve.errors import EngineOverloaded

        if self.count >= self.limit:
            raise EngineOverloaded()
        self.count += 1

    def release(self) -> None:
        self.count -= 1

    async def admit(self, work: Callable[[], Awaitable[EngineResult]]) -> EngineResult:
        """Run `work` if there is room; hold the slot until its response has ended."""
        self.acquire()
        try:
            result = await work()
        except BaseException:
            self.release()
            raise
        if isinstance(result, bytes):
            self.release()
            return result
        return self.track(result)

    def track(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Release when the stream ends, is closed, or is dropped unstarted."""
        return _TrackedStream(stream, self.release)


class _TrackedStream:
    def __init__(self, inner: AsyncIterator[bytes], on_done: Any) -> None:
        self._inner = inner
        self._on_done = on_done
        self._done = False

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._on_done()

    def __aiter__(self) -> _TrackedStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._inner.__anext__()
        except BaseException:
            self._finish()
            raise

    async def aclose(self) -> None:
        self._finish()
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()

    def __del__(self) -> None:
        self._finish()
