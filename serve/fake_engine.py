"""A deterministic fake engine for tests and benchmarks.

Token ``i`` of choice ``c`` is the word ``tok{(seed + c + i) % 997}``; the prompt's
token count is its whitespace word count. Time to first token, inter-token latency,
overload and failure injection are configurable. It speaks the same OpenAI shapes (Responses and
embeddings included, Anthropic's for Messages, vLLM's for tokenize) as the vLLM engine so that the
gateway cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from serve import fake_messages, fake_pooling, fake_responses
from serve.config import FakeEngineConfig
from serve.engine import Endpoint, Engine, EngineResult, EngineStats, InflightLimiter, ModelCard
from serve.errors import ContextLengthExceeded, EngineFailure

DONE = b"data: [DONE]\n\n"


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split()) or 1
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return _words(value.get("content") or value.get("text") or "")
    return 0


def _prompt_words(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """The fake engine's token count of a prompt: its words (Messages: the system prompt's too)."""
    if endpoint == "messages":
        system = body.get("system")
        return (_words(system) if system else 0) + _words(body.get("messages"))
    if endpoint == "responses":
        instructions = body.get("instructions")
        return (_words(instructions) if instructions else 0) + _words(body.get("input"))
    if endpoint == "embeddings":
        return _words(body.get("input"))
    return _words(body.get("messages") if endpoint == "chat" else body.get("prompt"))


def _prompt_count(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """How many prompts a request carries (a completions batch: a list of texts or of token lists)."""
    prompt = body.get("prompt")
    if endpoint != "completion" or not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


# Endpoints answered in their own shapes: (id prefix, the module that writes the full answer and the events).
_NAMED_EVENT_SHAPES: dict[Endpoint, tuple[str, Any]] = {"responses": ("resp_", fake_responses),
                                                        "messages": ("msg_", fake_messages)}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class FakeEngine(Engine):
    """Deterministic engine; see the module docstring."""

    def __init__(self, model_id: str, cfg: FakeEngineConfig | None = None, root: str | None = None) -> None:
        self.cfg = cfg or FakeEngineConfig()
        self._card = ModelCard(
            id=model_id, created=int(time.time()), root=root or model_id, max_model_len=self.cfg.max_model_len, engine="fake"
        )
        self._admission = InflightLimiter(self.cfg.max_running)

    @property
    def card(self) -> ModelCard:
        return self._card

    async def start(self) -> None:
        if self.cfg.start_s:
            await asyncio.sleep(self.cfg.start_s)
        if self.cfg.start_error:
            raise EngineFailure(self.cfg.start_error)

    async def check_health(self) -> None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(running=self._admission.count, admitted=self._admission.count)

    def _should_fail(self, request_id: str) -> bool:
        if self.cfg.fail_rate <= 0:
            return False
        return (zlib.crc32(request_id.encode()) % 10_000) < self.cfg.fail_rate * 10_000

    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        self._admission.limit = self.cfg.max_running
        return await self._admission.admit(lambda: self._generate(endpoint, body, request_id))

    async def count_prompt_tokens(self, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        return _prompt_words(endpoint, body)

    async def _generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        if endpoint == "embeddings":
            await asyncio.sleep(self.cfg.ttft_ms / 1000)
            return fake_pooling.embeddings(self._card.id, body, request_id)
        if endpoint == "tokenize":
            return fake_pooling.tokenize(body, self.cfg.max_model_len)
        if endpoint == "detokenize":
            return fake_pooling.detokenize(body)
        prompt_tokens = _prompt_words(endpoint, body)
        # vLLM's semantics: max_completion_tokens is chat's (and wins there); completions read max_tokens only.
        chat_max = body.get("max_completion_tokens") if endpoint == "chat" else None
        asked = body.get("max_output_tokens") if endpoint == "responses" else body.get("max_tokens")
        max_tokens = chat_max or asked or self.cfg.default_max_tokens
        if prompt_tokens + max_tokens > self.cfg.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.cfg.max_model_len} tokens; the request asks for "
                f"{prompt_tokens} prompt + {max_tokens} completion tokens.",
                param={"completion": "prompt", "responses": "max_output_tokens"}.get(endpoint, "max_tokens"),
            )
        fail = self._should_fail(request_id)
        if fail and self.cfg.fail_after_tokens is None:
            raise EngineFailure("injected failure")
        seed = int(body.get("seed") or 0)
        n = int(body.get("n") or 1) * _prompt_count(endpoint, body)  # a batch: n choices for each prompt
        stops = body.get("stop_sequences" if endpoint == "messages" else "stop") or []
        stops = [] if endpoint == "responses" else stops  # the Responses API has no stop sequences
        stops = [stops] if isinstance(stops, str) else list(stops)
        choices = [self._tokens(seed, c, max_tokens, stops) for c in range(n)]
        meta = {
            "id": ("chatcmpl-" if endpoint == "chat" else "cmpl-") + request_id,
            "created": int(time.time()),
            "model": self._card.id,
        }
        shape = _NAMED_EVENT_SHAPES.get(endpoint)
        if shape is not None:  # Responses and Messages: one answer, its own object and named stream events
            prefix, module = shape
            meta["id"] = prefix + request_id
            (tokens, finish), = choices
            if body.get("stream"):
                fail_at = (self.cfg.fail_after_tokens or 0) if fail else None
                return module.events(meta, body, tokens, finish, prompt_tokens, ttft_s=self.cfg.ttft_ms / 1000,
                                     itl_s=self.cfg.itl_ms / 1000, fail_at=fail_at)
            await asyncio.sleep((self.cfg.ttft_ms + self.cfg.itl_ms * max(0, len(tokens) - 1)) / 1000)
            return orjson.dumps(module.full(meta, body, tokens, finish, prompt_tokens))
        if body.get("stream"):
            return self._stream(endpoint, body, meta, choices, prompt_tokens, fail)
        total = sum(len(t) for t, _ in choices)
        await asyncio.sleep((self.cfg.ttft_ms + self.cfg.itl_ms * max(0, total // n - 1)) / 1000)
        return orjson.dumps(self._full(endpoint, meta, choices, prompt_tokens))

    @staticmethod
    def _tokens(seed: int, choice: int, max_tokens: int, stops: list[str]) -> tuple[list[str], str]:
        toks: list[str] = []
        text = ""
        for i in range(max_tokens):
            tok = f"tok{(seed + choice * 31 + i) % 997} "
            candidate = text + tok
            hit = next((s for s in stops if s and s in candidate), None)
            if hit is not None:
                cut = candidate[: candidate.index(hit)]
                if len(cut) > len(text):
                    toks.append(cut[len(text) :])
                return toks, "stop"
            toks.append(tok)
            text = candidate
        return toks, "length"

    def _full(self, endpoint: Endpoint, meta: dict[str, Any], choices: list[tuple[list[str], str]], ptoks: int) -> dict:
        completion_tokens = sum(len(t) for t, _ in choices)
        usage = {"prompt_tokens": ptoks, "completion_tokens": completion_tokens, "total_tokens": ptoks + completion_tokens}
        if endpoint == "chat":
            out = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(t)},
                    "logprobs": None,
                    "finish_reason": fr,
                }
                for i, (t, fr) in enumerate(choices)
            ]
            return {**meta, "object": "chat.completion", "choices": out, "usage": usage}
        out = [
            {"index": i, "text": "".join(t), "logprobs": None, "finish_reason": fr} for i, (t, fr) in enumerate(choices)
        ]
        return {**meta, "object": "text_completion", "choices": out, "usage": usage}

    async def _stream(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        meta: dict[str, Any],
        choices: list[tuple[list[str], str]],
        ptoks: int,
        fail: bool,
    ) -> AsyncIterator[bytes]:
        chat = endpoint == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        await asyncio.sleep(self.cfg.ttft_ms / 1000)
        if chat:
            for i in range(len(choices)):
                yield _sse({**meta, "object": obj, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ]})
        longest = max(len(t) for t, _ in choices)
        for step in range(longest):
            if step and self.cfg.itl_ms:
                await asyncio.sleep(self.cfg.itl_ms / 1000)
            if fail and step >= (self.cfg.fail_after_tokens or 0):
                raise EngineFailure("injected failure after the stream started")
            for i, (toks, _) in enumerate(choices):
                if step < len(toks):
                    part: dict[str, Any] = {"delta": {"content": toks[step]}} if chat else {"text": toks[step]}
                    yield _sse({**meta, "object": obj, "choices": [
                        {"index": i, **part, "logprobs": None, "finish_reason": None}
                    ]})
        for i, (_, finish) in enumerate(choices):
            part = {"delta": {}} if chat else {"text": ""}
            yield _sse({**meta, "object": obj, "choices": [
                {"index": i, **part, "logprobs": None, "finish_reason": finish}
            ]})
        if include_usage:
            ct = sum(len(t) for t, _ in choices)
            usage = {"prompt_tokens": ptoks, "completion_tokens": ct, "total_tokens": ptoks + ct}
            yield _sse({**meta, "object": obj, "choices": [], "usage": usage})
        yield DONE
