"""Conversation affinity, pure: which gateway replica a request goes to so its prompt prefix is cached there.

Each gateway replica hosts its own engines, and vLLM keeps a prefix cache per engine: the
second turn of a conversation skips the prefill of everything the first turn computed,
but only on the replica that served the first turn. So requests carry a *conversation
key* and replicas are ranked by rendezvous hashing on it (highest random weight): every
router ranks them the same way without sharing state, and adding or removing a replica
moves only the conversations of that replica. A replica more than `max_load_gap`
requests busier than the least busy one is passed over, so a hot conversation cannot
pile up on one replica while others idle; so is one whose engines' KV cache is
`max_kv_cache_usage` full or more (its running requests hold the blocks a new one would
need: vLLM would queue the request there, or preempt one, while another replica has room).
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

PROMPT_KEY_CHARS = 512  # a completion prompt's routing key: its opening (few-shot preambles, shared documents)


def _text(content: Any) -> str:
    """A message's content as one string (text parts of a list joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def conversation_key(body: Mapping[str, Any] | None, session: str | None = None) -> str | None:
    """The key a request's replica is chosen by; None when there is nothing to stick to.

    In order: OpenAI's `prompt_cache_key` (the client names what shares a cache); the
    session header; the conversation's opening: the model and every message up to and
    including the first user message, which every later turn repeats; for a completion,
    the model and the prompt's first `PROMPT_KEY_CHARS` characters.
    """
    if body is not None:
        cache_key = body.get("prompt_cache_key")
        if isinstance(cache_key, str) and cache_key:
            return "k:" + cache_key
    if session:
        return "s:" + session
    if body is None:
        return None
    model = body.get("model")
    model = model if isinstance(model, str) else ""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        opening: list[str] = []
        for msg in messages:
            if not isinstance(msg, dict):
                return None
            opening.append(f"{msg.get('role')}\x1f{_text(msg.get('content'))}")
            if msg.get("role") == "user":
                break
        return "m:" + model + "\x1e" + "\x1e".join(opening)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return "p:" + model + "\x1e" + prompt[:PROMPT_KEY_CHARS]
    return None


def _weight(key: bytes, replica: str) -> bytes:
    return blake2b(key + b"\x00" + replica.encode(), digest_size=8).digest()


def rank_replicas(key: str, loads: Mapping[str, int], max_load_gap: int,
                  kv_cache_usage: Mapping[str, float] | None = None, max_kv_cache_usage: float | None = None) -> list[str]:
    """Replicas in the order to try them for `key`.

    Rendezvous order (the same for a key on every router), except that a replica carrying
    more than `max_load_gap` requests above the least loaded one, or whose KV cache use (0-1,
    `kv_cache_usage`, absent: 0) is at `max_kv_cache_usage` or above, goes after all the
    others. Replicas all passed over keep the rendezvous order: affinity again.
    """
    k = key.encode()
    order = sorted(loads, key=lambda r: _weight(k, r), reverse=True)
    if not order:
        return order
    ceiling = min(loads.values()) + max_load_gap
    kv = kv_cache_usage or {}

    def passed_over(r: str) -> bool:
        return loads[r] > ceiling or (max_kv_cache_usage is not None and kv.get(r, 0.0) >= max_kv_cache_usage)

    return [r for r in order if not passed_over(r)] + [r for r in order if passed_over(r)]
