"""Anthropic's Messages responses on their way out: usage read from the full body or the stream's events.

A Messages stream is named events (`event: message_start` ... `message_stop`), not OpenAI's chunks: the
prompt's tokens come in `message_start`, the generated ones (cumulative) in `message_delta`, with the stop
reason. Every event reaches the client as sent; usage is always in the stream, nothing is asked for or dropped.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import sse_error_event
from gateway.governance.gate import Outcome

_TEXT_DELTA = b'"type":"content_block_delta"'


def _input_tokens(usage: dict[str, Any]) -> int:
    """What the prompt cost: Anthropic splits it into fresh, cache-read and cache-written tokens."""
    return sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens",
                                                   "cache_creation_input_tokens"))


def _fill_prompt(usage: dict[str, Any], outcome: Outcome) -> None:
    outcome.prompt_tokens = _input_tokens(usage)
    outcome.cached_tokens = int(usage.get("cache_read_input_tokens") or 0)


def read_usage(payload: bytes, outcome: Outcome) -> None:
    """Fill `outcome` from a full Messages response (usage and the stop reason)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    if not isinstance(doc, dict):
        return
    usage = doc.get("usage") or {}
    _fill_prompt(usage, outcome)
    outcome.completion_tokens = int(usage.get("output_tokens") or 0)
    outcome.finish_reason = doc.get("stop_reason")


def observe(chunk: bytes, outcome: Outcome, client_wants_usage: bool) -> bytes:
    """Note the content deltas relayed, the prompt's tokens (`message_start`) and the final usage and stop
    reason (`message_delta`); the chunk goes on unchanged."""
    outcome.events += chunk.count(_TEXT_DELTA)
    if b'"usage":{' not in chunk:
        return chunk
    for event in chunk.split(b"\n\n"):
        data = next((line[6:] for line in event.split(b"\n") if line.startswith(b"data: {")), None)
        if data is None or b'"usage":{' not in data:
            continue
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        kind = doc.get("type")
        if kind == "message_start":
            _fill_prompt((doc.get("message") or {}).get("usage") or {}, outcome)
        elif kind == "message_delta":
            usage = doc.get("usage") or {}
            if _input_tokens(usage):
                _fill_prompt(usage, outcome)
            outcome.completion_tokens = int(usage.get("output_tokens") or 0)
            outcome.finish_reason = (doc.get("delta") or {}).get("stop_reason") or outcome.finish_reason
            outcome.usage_seen = True
    return chunk


def error_events(exc: BaseException) -> list[bytes]:
    """Anthropic's `error` event for a failure after the stream started, its last (Anthropic's have no [DONE])."""
    return [sse_error_event(exc, "anthropic")]
