"""The response body on its way out: usage and finish reasons noted, the usage event the client did not ask
for dropped, an error after the start turned into one SSE event, and settlement run however the body ended."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.responses import Response, StreamingResponse

from gateway import anthropic_wire, responses_wire
from gateway.dispatch import Started
from gateway.errors import sse_error_event, status_of
from gateway.governance.gate import Outcome
from serve.engine import Endpoint

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


class SettleAfterResponse(Response):
    """Runs its background task (the quota settlement) even when sending the body fails."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task, self.background = self.background, None
        try:
            await super().__call__(scope, receive, send)
        finally:
            if task is not None:
                await task()


class SettledStream(StreamingResponse):
    """An SSE response whose `closer` runs however it ends, its body sent or not.

    `relay` settles in its own `finally`, but a generator that never started has no `finally` to run:
    when the client is gone before the first byte (the response start fails, or Starlette sees the
    disconnect first), Starlette never iterates the body, and the request's concurrency slot and
    reservation stayed held until the lease expired. `closer` must be idempotent: it runs after a
    normal end too.
    """

    def __init__(self, content: AsyncIterator[bytes], closer: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.closer = closer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.closer()


def fill_usage(usage: dict[str, Any], outcome: Outcome) -> None:
    """Tokens from OpenAI's `usage` (chat, completions, embeddings): the prompt's cached share from
    `prompt_tokens_details.cached_tokens`, which vLLM reports when its prefix cache served part of the prompt."""
    outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    outcome.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


def read_usage(payload: bytes, outcome: Outcome) -> None:
    """Fill `outcome` from a full response body (usage and the first choice's finish reason)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    fill_usage(doc.get("usage") or {}, outcome)
    choices = doc.get("choices") or []
    if choices:
        outcome.finish_reason = choices[0].get("finish_reason")


def want_usage(body: dict[str, Any]) -> bool:
    """Ask a stream for its usage chunk (to settle quotas); True if the client asked for it itself."""
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        return True
    body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return False


def observe(chunk: bytes, outcome: Outcome, client_wants_usage: bool) -> bytes:
    """Note usage, finish reasons and events passing by; drop the usage event the client did not ask for."""
    outcome.events += chunk.count(b'"choices":[{')
    if b'"finish_reason":"' in chunk and outcome.finish_reason is None:
        for event in chunk.split(b"\n\n"):
            if b'"finish_reason":"' in event and event.startswith(b"data: {"):
                try:
                    choices = orjson.loads(event[6:]).get("choices") or []
                except orjson.JSONDecodeError:
                    continue
                outcome.finish_reason = next((c.get("finish_reason") for c in choices if c.get("finish_reason")), None)
                break
    if b'"usage":{' not in chunk:
        return chunk
    kept = []
    for event in chunk.split(b"\n\n"):
        if b'"usage":{' in event and event.startswith(b"data: {"):
            try:
                doc = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                doc = {}
            fill_usage(doc.get("usage") or {}, outcome)
            outcome.usage_seen = True
            if not client_wants_usage and not doc.get("choices"):
                continue
        if event:
            kept.append(event)
    return b"\n\n".join(kept) + b"\n\n" if kept else b""


def error_events(exc: BaseException) -> list[bytes]:
    """Chat and completions: an error event in OpenAI's envelope, then [DONE]."""
    return [sse_error_event(exc), DONE]


def usage_always_sent(body: dict[str, Any]) -> bool:
    """Messages and Responses streams always carry their usage: nothing to ask for, nothing to drop."""
    return True


@dataclass(frozen=True)
class Wire:
    """How one endpoint's responses carry usage, and how its stream tells of an error after the start."""

    read_usage: Callable[[bytes, Outcome], None]
    want_usage: Callable[[dict[str, Any]], bool]
    observe: Callable[[bytes, Outcome, bool], bytes]
    error_events: Callable[[BaseException], list[bytes]]
    opens_with_role: bool  # each choice's stream opens with a role-only event (no token in it)


OPENAI_CHAT = Wire(read_usage, want_usage, observe, error_events, opens_with_role=True)
OPENAI_COMPLETION = Wire(read_usage, want_usage, observe, error_events, opens_with_role=False)
ANTHROPIC = Wire(anthropic_wire.read_usage, usage_always_sent, anthropic_wire.observe, anthropic_wire.error_events,
                 opens_with_role=False)
RESPONSES = Wire(responses_wire.read_usage, usage_always_sent, responses_wire.observe, responses_wire.error_events,
                 opens_with_role=False)
# Embeddings, tokenize and detokenize never stream: OpenAI's `usage` (prompt tokens only) in the full body, or none.
WIRES: dict[Endpoint, Wire] = {"chat": OPENAI_CHAT, "completion": OPENAI_COMPLETION, "messages": ANTHROPIC,
                               "responses": RESPONSES, "embeddings": OPENAI_COMPLETION, "tokenize": OPENAI_COMPLETION,
                               "detokenize": OPENAI_COMPLETION}


async def relay(
    stream: Started, outcome: Outcome, client_wants_usage: bool, request_id: str,
    finish: Callable[[bool], Awaitable[None]], wire: Wire = OPENAI_CHAT,
) -> AsyncIterator[bytes]:
    """The client's SSE body: one generator per stream, however many events.

    Events pass through the wire's `observe`; an error after the start becomes the wire's error events
    (OpenAI: an error event and [DONE]); `finish(client_left)` runs once at the end, however the stream ended.
    """
    client_left = False
    try:
        chunk = wire.observe(stream.head, outcome, client_wants_usage) if stream.head else b""
        if chunk:
            yield chunk
        async for chunk in stream.rest:
            chunk = wire.observe(chunk, outcome, client_wants_usage)
            if chunk:
                yield chunk
    except Exception as exc:  # noqa: BLE001 - every failure must reach the client as an event
        logger.warning("stream %s failed after start: %s", request_id, exc)
        outcome.status = status_of(exc)  # the ledger and metrics see the failure the client was sent
        for event in wire.error_events(exc):
            yield event
    except BaseException:  # cancelled or closed: the client went away mid-stream
        client_left = True
        raise
    finally:
        # Shielded: when the client leaves, Starlette cancels the response's task group, and anyio's
        # cancellation hits every await after it. Unshielded, the engine's abort, the quota settlement
        # and the ledger row never ran for a stream the client dropped (Serve replicas).
        with anyio.CancelScope(shield=True):
            try:
                await stream.aclose()
            finally:
                await finish(client_left)
