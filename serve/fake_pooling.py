"""The fake engine's embeddings, tokenize and detokenize: deterministic, in OpenAI's and vLLM's shapes.

A text's tokens are its whitespace words; the word ``tok<N>`` (what the fake engine generates) is token N,
any other word a hash of it below the vocabulary size. An embedding is a unit vector drawn from a seed
of the input (the same input: the same vector), `dimensions` long where asked.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import zlib
from typing import Any

import orjson

from serve.errors import InvalidRequest

VOCAB_SIZE = 1000
EMBEDDING_SIZE = 64


def token_id(word: str) -> int:
    if word.startswith("tok") and word[3:].isdigit() and int(word[3:]) < VOCAB_SIZE:
        return int(word[3:])
    return zlib.crc32(word.encode()) % VOCAB_SIZE


def token_ids(text: str) -> list[int]:
    return [token_id(w) for w in text.split()]


def _inputs(value: Any) -> list[str | list[int]]:
    """An embeddings `input` as its list of inputs (a text, texts, a token list, token lists)."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]
    return list(value)


def _vector(item: str | list[int], size: int) -> list[float]:
    seed = zlib.crc32(item.encode() if isinstance(item, str) else orjson.dumps(item))
    values = []
    for _ in range(size):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        values.append(seed / 0x7FFFFFFF - 0.5)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings(model: str, body: dict[str, Any], request_id: str) -> bytes:
    """An embeddings response: one vector per input, float or base64 (little-endian float32) as asked."""
    size = body.get("dimensions") or EMBEDDING_SIZE
    if size > EMBEDDING_SIZE:
        raise InvalidRequest(f"dimensions must be at most {EMBEDDING_SIZE} for this model.", param="dimensions")
    items = _inputs(body.get("input"))
    data = []
    for i, item in enumerate(items):
        vector: Any = _vector(item, size)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(len(item) if isinstance(item, list) else len(item.split()) or 1 for item in items)
    return orjson.dumps({"id": f"embd-{request_id}", "object": "list", "created": int(time.time()), "model": model,
                         "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def tokenize(body: dict[str, Any], max_model_len: int) -> bytes:
    """vLLM's tokenize answer: a prompt's token ids (a chat's: every message's content, in order)."""
    if body.get("messages") is not None:
        text = " ".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))
    else:
        text = body.get("prompt") or ""
    ids = token_ids(text)
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}
    if body.get("return_token_strs"):
        answer["token_strs"] = [f"tok{i}" for i in ids]
    return orjson.dumps(answer)


def detokenize(body: dict[str, Any]) -> bytes:
    """vLLM's detokenize answer: the text of token ids."""
    tokens = body.get("tokens") or []
    bad = next((t for t in tokens if not 0 <= t < VOCAB_SIZE), None)
    if bad is not None:
        raise InvalidRequest(f"Token id {bad} is outside the vocabulary (0 to {VOCAB_SIZE - 1}).", param="tokens")
    return orjson.dumps({"prompt": " ".join(f"tok{t}" for t in tokens)})
