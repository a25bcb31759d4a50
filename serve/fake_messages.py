"""The fake engine's answers in Anthropic's Messages shapes (the full message and its named stream events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from serve.errors import EngineFailure

_STOP_REASONS = {"length": "max_tokens", "stop": "stop_sequence"}


def _event(kind: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **doc}) + b"\n\n"


def stop_reason(finish: str, stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's stop reason (and the stop sequence that ended it) for the fake's finish reason."""
    if finish == "stop":
        return "stop_sequence", next((s for s in stops if s), None)
    return _STOP_REASONS.get(finish, "end_turn"), None


def full(meta: dict[str, Any], body: dict[str, Any], tokens: list[str], finish: str, prompt_tokens: int) -> dict:
    """The whole message."""
    reason, sequence = stop_reason(finish, body.get("stop_sequences") or [])
    return {
        "id": meta["id"], "type": "message", "role": "assistant", "model": meta["model"],
        "content": [{"type": "text", "text": "".join(tokens)}],
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": len(tokens)},
    }


async def events(
    meta: dict[str, Any], body: dict[str, Any], tokens: list[str], finish: str, prompt_tokens: int, *,
    ttft_s: float, itl_s: float, fail_at: int | None,
) -> AsyncIterator[bytes]:
    """The stream Anthropic sends: message_start, one text block's deltas, message_delta (usage), message_stop."""
    await asyncio.sleep(ttft_s)
    start = {**full(meta, body, [], finish, prompt_tokens), "content": [], "stop_reason": None,
             "stop_sequence": None}
    start["usage"] = {"input_tokens": prompt_tokens, "output_tokens": 0}
    yield _event("message_start", {"message": start})
    yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for step, tok in enumerate(tokens):
        if step and itl_s:
            await asyncio.sleep(itl_s)
        if fail_at is not None and step >= fail_at:
            raise EngineFailure("injected failure after the stream started")
        yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": tok}})
    yield _event("content_block_stop", {"index": 0})
    reason, sequence = stop_reason(finish, body.get("stop_sequences") or [])
    yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                   "usage": {"output_tokens": len(tokens)}})
    yield _event("message_stop", {})
