"""Keys, quotas, routes and the ledger on the real stack (Serve + vLLM + Redis), via the openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.conftest import LiveStack

MSG = [{"role": "user", "content": "Say something."}]


def _admin(stack: LiveStack, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(
        method, stack.base_url + path, headers={"authorization": f"Bearer {stack.admin_key}"}, timeout=30, **kw
    )


def _client(stack: LiveStack, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0, _strict_response_validation=True)


@pytest.fixture
def limited(stack: LiveStack) -> tuple[str, str]:
    r = _admin(stack, "POST", "/admin/keys", json={
        "name": "it", "tier": "premium", "allowed_models": ["chat"], "limits": {"rpm": 3, "tpm": 100_000},
    })
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def test_quota_headers_then_429_on_vllm(stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    client = _client(stack, key)
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=4)
        completion = raw.parse()
        assert completion.model == stack.model  # the route's target answered, at premium priority
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="chat", messages=MSG, max_tokens=4)
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.body["type"] == "requests"  # type: ignore[index]


def test_allow_list_and_usage_ledger_on_vllm(stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    client = _client(stack, key)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=stack.model, messages=MSG, max_tokens=4)
    stream = client.chat.completions.create(model="chat", messages=MSG, max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)  # the usage chunk we asked for is not passed on
    rows = _admin(stack, "GET", f"/admin/usage?key_id={key_id}").json()["data"]
    assert len(rows) == 1 and rows[0]["model"] == "chat" and rows[0]["requests"] == 1
    assert rows[0]["completion_tokens"] == 5 and rows[0]["prompt_tokens"] > 0


def test_revoked_key_refused_within_a_second(stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    client = _client(stack, key)
    assert client.models.list().data
    assert _admin(stack, "POST", f"/admin/keys/{key_id}/revoke").status_code == 200
    t0 = time.monotonic()
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.05)
