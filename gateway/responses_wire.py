"""OpenAI's Responses on their way out: usage read from the response object or the stream's typed events.

A Responses stream is named events (`response.created`, `response.output_text.delta`, ...): the usage comes
once, in the final `response.completed` (or `response.incomplete`, `response.failed`) event's response.
Every event reaches the client as sent. An error after the start is Responses' own `error` event.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import error_body
from gateway.governance.gate import Outcome

_TEXT_DELTA = b'"type":"response.output_text.delta"'
_FINAL = (b'"type":"response.completed"', b'"type":"response.incomplete"', b'"type":"response.failed"')


def _fill(response: dict[str, Any], outcome: Outcome) -> None:
    usage = response.get("usage") or {}
    outcome.prompt_tokens = int(usage.get("input_tokens") or 0)
    outcome.completion_tokens = int(usage.get("output_tokens") or 0)
    details = usage.get("input_tokens_details")
    outcome.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    reason = (response.get("incomplete_details") or {}).get("reason")
    outcome.finish_reason = reason or response.get("status")


def read_usage(payload: bytes, outcome: Outcome) -> None:
    """Fill `outcome` from a full response object (usage, and its status or why it is incomplete)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    if isinstance(doc, dict):
        _fill(doc, outcome)


def observe(chunk: bytes, outcome: Outcome, client_wants_usage: bool) -> bytes:
    """Note the text deltas relayed and, from the final event, the usage; the chunk goes on unchanged."""
    outcome.events += chunk.count(_TEXT_DELTA)
    if not any(marker in chunk for marker in _FINAL):
        return chunk
    for event in chunk.split(b"\n\n"):
        data = next((line[6:] for line in event.split(b"\n") if line.startswith(b"data: {")), None)
        if data is None or not any(marker in data for marker in _FINAL):
            continue
        try:
            response = orjson.loads(data).get("response") or {}
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if response.get("usage"):
            _fill(response, outcome)
            outcome.usage_seen = True
    return chunk


def error_events(exc: BaseException) -> list[bytes]:
    """Responses' `error` event for a failure after the stream started (the stream ends with it)."""
    _, envelope, _ = error_body(exc)
    err = envelope["error"]
    doc = {"type": "error", "code": err["code"], "message": err["message"], "param": err["param"],
           "sequence_number": 0}
    return [b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"]
