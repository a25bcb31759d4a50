"""Anthropic's Messages API (`POST /v1/messages`) on the real stack (Serve + vLLM + Redis), through the official
`anthropic` client with strict response validation: answers, streams, keys, quotas and the ledger."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.integration.conftest import LiveStack

MSG = [{"role": "user", "content": "Say something."}]


def _client(stack: LiveStack, **auth: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, max_retries=0, _strict_response_validation=True, **auth)


@pytest.fixture
def limited(stack: LiveStack) -> tuple[str, str]:
    r = stack.admin("POST", "/admin/keys", json={
        "name": "messages", "allowed_models": ["chat"], "limits": {"rpm": 10, "tpm": 100_000},
    })
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def test_a_message_is_reserved_at_vllm_s_exact_count_and_charged_its_usage(
        stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    raw = _client(stack, api_key=key).messages.with_raw_response.create(
        model="chat", max_tokens=6, system="You are terse.", messages=MSG)
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.model == stack.model
    assert msg.content and msg.content[0].type == "text"
    assert msg.stop_reason in ("max_tokens", "end_turn") and 0 < msg.usage.output_tokens <= 6
    # `prompt_token_count: engine`: vLLM's own count of the converted prompt (its count_tokens) + max_tokens.
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100_000 - (msg.usage.input_tokens + 6)
    rows = stack.usage_rows(key_id, 1)
    assert rows[0]["prompt_tokens"] == msg.usage.input_tokens
    assert rows[0]["completion_tokens"] == msg.usage.output_tokens


def test_a_streamed_message_with_a_bearer_key(stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    with _client(stack, auth_token=key).messages.stream(model="chat", max_tokens=8, messages=MSG) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(b.text for b in final.content if b.type == "text")
    assert final.usage.output_tokens == 8 or final.stop_reason == "end_turn"
    rows = stack.usage_rows(key_id, 1)
    assert rows[0]["completion_tokens"] == final.usage.output_tokens and rows[0]["prompt_tokens"] > 0


def test_errors_come_in_anthropic_s_shape(stack: LiveStack, limited: tuple[str, str]) -> None:
    _, key = limited
    client = _client(stack, api_key=key)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="chat", max_tokens=5000, messages=MSG)  # past the 1,024-token context
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):  # a model the key may not use looks like one that does not exist
        client.messages.create(model=stack.model, max_tokens=4, messages=MSG)
    with pytest.raises(anthropic.AuthenticationError):
        _client(stack, api_key="sk-wrong-0123456789abcdef").messages.create(model="chat", max_tokens=4, messages=MSG)
    r = httpx.post(stack.base_url + "/v1/messages", headers={"x-api-key": key}, timeout=30,
                   json={"model": "chat", "messages": MSG})  # max_tokens is required
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
