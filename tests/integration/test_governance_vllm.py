"""Keys, quotas, routes and the ledger on the real stack (Serve + vLLM + Redis), via the openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.conftest import LiveStack

MSG = [{"role": "user", "content": "Say something."}]


def _client(stack: LiveStack, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0, _strict_response_validation=True)


@pytest.fixture
def limited(stack: LiveStack) -> tuple[str, str]:
    r = stack.admin("POST", "/admin/keys", json={
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


def test_token_reservation_is_vllms_exact_prompt_count(stack: LiveStack, limited: tuple[str, str]) -> None:
    """`prompt_token_count: engine`: the reservation is vLLM's prompt length (chat template included) + max_tokens."""
    _, key = limited
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Count the tokens of this sentence, template and all, exactly."}]
    raw = _client(stack, key).chat.completions.with_raw_response.create(model="chat", messages=messages, max_tokens=7)
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens > 0
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100_000 - (usage.prompt_tokens + 7)


def test_allow_list_and_usage_ledger_on_vllm(stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    client = _client(stack, key)
    with pytest.raises(openai.NotFoundError):  # a model the key may not use looks like one that does not exist
        client.chat.completions.create(model=stack.model, messages=MSG, max_tokens=4)
    stream = client.chat.completions.create(model="chat", messages=MSG, max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)  # the usage chunk we asked for is not passed on
    rows = stack.usage_rows(key_id)  # written as the stream ends, which the client may see first
    assert len(rows) == 1 and rows[0]["model"] == "chat" and rows[0]["requests"] == 1
    assert rows[0]["completion_tokens"] == 5 and rows[0]["prompt_tokens"] > 0


def test_a_stream_the_client_leaves_is_charged_what_it_was_sent(stack: LiveStack, limited: tuple[str, str]) -> None:
    """No usage event reaches the gateway when the client goes: the ledger (and the quota) get the tokens relayed."""
    key_id, key = limited
    body = {"model": "chat", "messages": MSG, "max_tokens": 400, "min_tokens": 400, "stream": True}
    with httpx.Client(base_url=stack.base_url, timeout=60, headers={"authorization": f"Bearer {key}"}) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 4:  # the role event and three tokens
                    break
    rows = stack.usage_rows(key_id)
    assert len(rows) == 1 and rows[0]["requests"] == 1, rows
    assert 3 <= rows[0]["completion_tokens"] < 400 and rows[0]["prompt_tokens"] > 0


def test_revoked_key_refused_within_a_second(stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    client = _client(stack, key)
    assert client.models.list().data
    assert stack.admin("POST", f"/admin/keys/{key_id}/revoke").status_code == 200
    t0 = time.monotonic()
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.05)


def test_what_vllm_generates_is_what_was_reserved(stack: LiveStack) -> None:
    """vLLM's own semantics, as the reservation assumes them: a coerced `n` and a batch run every sequence;
    `max_completion_tokens` bounds nothing on completions. Each request's usage fits its reservation exactly."""
    r = stack.admin("POST", "/admin/keys", json={"name": "shapes", "limits": {"tpm": 1_000_000}})
    auth = {"authorization": f"Bearer {r.json()['key']}"}

    def post(path: str, body: dict) -> httpx.Response:
        resp = httpx.post(stack.base_url + path, headers=auth, timeout=120,
                          json={"model": stack.model, "seed": 7, "ignore_eos": True, **body})
        assert resp.status_code == 200, resp.text
        return resp

    chat = post("/v1/chat/completions", {"messages": MSG, "n": "2", "max_tokens": 3}).json()
    assert len(chat["choices"]) == 2 and chat["usage"]["completion_tokens"] == 2 * 3
    raw = post("/v1/completions", {"prompt": ["one", "two", "three"], "n": 2, "max_tokens": 4,
                                   "max_completion_tokens": 1})
    batch = raw.json()
    assert len(batch["choices"]) == 3 * 2 and batch["usage"]["completion_tokens"] == 3 * 2 * 4
    # Reserved: vLLM's count of the three prompts + 3 x 2 x 4, after the chat request settled to its usage.
    reserved = batch["usage"]["prompt_tokens"] + 3 * 2 * 4
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 1_000_000 - chat["usage"]["total_tokens"] - reserved


def test_vllms_cached_prompt_tokens_are_recorded_and_priced(stack: LiveStack) -> None:
    """The same long prompt twice: vLLM's prefix cache serves whole blocks of the second, its usage says how many
    (`cached_tokens`), and the ledger records them and prices them at `cached_input`, with the caller's `user`."""
    r = stack.admin("POST", "/admin/keys", json={"name": "priced", "limits": {"spend_per_day": 10}})
    key_id, key = r.json()["id"], r.json()["key"]
    words = " ".join(f"w{i}" for i in range(300))
    messages = [{"role": "user", "content": f"Context {key_id}: {words}"}]  # unique: nothing cached before
    client = _client(stack, key)
    usages = [client.chat.completions.create(model=stack.model, messages=messages, max_tokens=4, user="it-user",
                                             temperature=0).usage for _ in range(2)]
    assert all(u is not None and u.prompt_tokens_details is not None for u in usages)
    cached = [u.prompt_tokens_details.cached_tokens or 0 for u in usages]  # type: ignore[union-attr]
    assert cached[0] == 0 and cached[1] >= 128, cached  # at least one whole KV block found the second time
    stack.usage_rows(key_id, count=2)  # both rows written
    rows = stack.admin("GET", f"/admin/usage?key_id={key_id}&group_by=key_id,end_user").json()["data"]
    assert len(rows) == 1 and rows[0]["end_user"] == "it-user" and rows[0]["requests"] == 2, rows
    assert rows[0]["cached_tokens"] == sum(cached)
    expected = sum((u.prompt_tokens - c) * 1_000_000 + c * 100_000 + u.completion_tokens * 2_000_000
                   for u, c in zip(usages, cached, strict=True))  # type: ignore[union-attr]
    assert rows[0]["cost_nanos"] == expected
    budget = stack.admin("GET", f"/admin/keys/{key_id}/budget").json()["key"]["spend_day"]
    assert budget["used"] == expected / 10**9 and budget["unit"] == "USD"
