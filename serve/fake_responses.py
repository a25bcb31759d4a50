"""The fake engine's answers in OpenAI's Responses shapes (the response object and its typed stream events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from serve.errors import EngineFailure


def full(meta: dict[str, Any], body: dict[str, Any], tokens: list[str] | None, finish: str,
         prompt_tokens: int) -> dict[str, Any]:
    """The response object; `tokens` None: still in progress (no output yet)."""
    done = tokens is not None
    output = [] if tokens is None else [_message(meta, "".join(tokens), "completed")]
    incomplete = done and finish == "length"
    out_tokens = len(tokens or [])
    return {
        "id": meta["id"], "object": "response", "created_at": meta["created"], "model": meta["model"],
        "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None, "instructions": body.get("instructions"), "metadata": body.get("metadata"),
        "output": output, "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"), "store": False,
        "usage": None if not done else {
            "input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + out_tokens,
        },
    }


def _message(meta: dict[str, Any], text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + meta["id"].removeprefix("resp_"), "role": "assistant",
            "status": status, "content": [{"type": "output_text", "text": text, "annotations": []}]}


async def events(
    meta: dict[str, Any], body: dict[str, Any], tokens: list[str], finish: str, prompt_tokens: int, *,
    ttft_s: float, itl_s: float, fail_at: int | None,
) -> AsyncIterator[bytes]:
    """The events the Responses API streams for one text answer, numbered as OpenAI numbers them."""
    seq = iter(range(1 << 30))

    def event(kind: str, doc: dict[str, Any]) -> bytes:
        return (b"event: " + kind.encode() + b"\ndata: "
                + orjson.dumps({"type": kind, "sequence_number": next(seq), **doc}) + b"\n\n")

    item = _message(meta, "", "in_progress")
    ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    await asyncio.sleep(ttft_s)
    yield event("response.created", {"response": full(meta, body, None, finish, prompt_tokens)})
    yield event("response.in_progress", {"response": full(meta, body, None, finish, prompt_tokens)})
    yield event("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}})
    yield event("response.content_part.added", {**ids, "part": {"type": "output_text", "text": "", "annotations": []}})
    for step, tok in enumerate(tokens):
        if step and itl_s:
            await asyncio.sleep(itl_s)
        if fail_at is not None and step >= fail_at:
            raise EngineFailure("injected failure after the stream started")
        yield event("response.output_text.delta", {**ids, "delta": tok, "logprobs": []})
    text = "".join(tokens)
    yield event("response.output_text.done", {**ids, "text": text, "logprobs": []})
    yield event("response.content_part.done", {**ids, "part": {"type": "output_text", "text": text, "annotations": []}})
    yield event("response.output_item.done", {"output_index": 0, "item": _message(meta, text, "completed")})
    # vLLM ends every stream with `response.completed` (an incomplete one says so in its status); so does the fake.
    yield event("response.completed", {"response": full(meta, body, tokens, finish, prompt_tokens)})
