"""The gateway on the fake engine, driven by the official `openai` client (no HTTP server)."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine
from tests.support import settled_outcomes

KEY = "test-key-0123456789abcdef"


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {
        "fake": FakeEngine("fake", FakeEngineConfig(max_model_len=64)),
        "broken": FakeEngine("broken", FakeEngineConfig(fail_rate=1.0, fail_after_tokens=2)),
    }


@pytest.fixture
def http(engines, tmp_path) -> httpx.AsyncClient:
    app = create_app(GatewaySettings(api_keys=[KEY], home=tmp_path), ModelBackend(engines, aliases={"chat": "fake"}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.fixture
def client(http) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=KEY, base_url="http://gw/v1", http_client=http, _strict_response_validation=True)


AUTH = {"authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hello there"}]


async def test_models_and_chat(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert {m.id for m in models.data} == {"fake", "broken"}
    resp = await client.chat.completions.create(model="chat", messages=MSG, max_tokens=3, seed=5)
    assert resp.choices[0].message.content == "tok5 tok6 tok7 "
    assert resp.usage and resp.usage.completion_tokens == 3 and resp.usage.prompt_tokens == 2


async def test_stream_usage_last_and_one_finish_per_choice(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake", messages=MSG, max_tokens=4, n=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    finishes = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == [0, 1]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


async def test_stop_and_completions(client: openai.AsyncOpenAI) -> None:
    resp = await client.completions.create(model="fake", prompt="a b c", max_tokens=5, stop=["tok2"])
    assert resp.choices[0].text == "tok0 tok1 " and resp.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "nope", "messages": MSG}, 404, "model", "model_not_found"),
        ({"model": "fake", "messages": []}, 400, "messages", None),
        ({"model": "fake", "messages": MSG, "temperature": 3}, 400, "temperature", None),
        ({"model": "fake", "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens", None),
        ({"model": "fake", "messages": MSG, "n": 0}, 400, "n", None),
        ({"model": "fake", "messages": MSG, "max_tokens": 100}, 400, "max_tokens", "context_length_exceeded"),
        ({"messages": MSG}, 400, "model", None),
        ({"model": "fake", "messages": MSG, "prompt_cache_key": 7}, 400, "prompt_cache_key", None),
    ],
)
async def test_bad_input_gets_the_envelope(http, body, status, param, code) -> None:
    r = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code


async def test_invalid_json_and_non_object(http) -> None:
    for raw in (b"{nope", b"[1,2]", b""):
        r = await http.post("/v1/chat/completions", content=raw, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_auth_failures_look_the_same(http) -> None:
    wrong = await http.post("/v1/chat/completions", json={}, headers={"authorization": "Bearer wrong-key-123456789"})
    other = await http.post("/v1/chat/completions", json={}, headers={"authorization": "Bearer another-wrong-key-xx"})
    assert wrong.status_code == other.status_code == 401
    assert wrong.json() == other.json()
    missing = await http.get("/v1/models")
    assert missing.status_code == 401
    in_url = await http.get(f"/v1/models?api_key={KEY}")
    assert in_url.status_code == 401


async def test_error_after_stream_start_is_one_event_then_done(http) -> None:
    body = {"model": "broken", "messages": MSG, "max_tokens": 5, "stream": True}
    r = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"error"' in events[-2] and '"code":"engine_error"' in events[-2]
    assert sum('"error"' in e for e in events) == 1


async def test_a_stream_that_fails_midway_is_settled_on_what_was_sent(http) -> None:
    """No usage event came: the quota and the ledger are charged the prompt and the tokens relayed, status 500."""
    seen = settled_outcomes(http._transport.app)
    body = {"model": "broken", "messages": MSG, "max_tokens": 5, "stream": True}
    r = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and '"error"' in r.text
    (outcome,) = seen
    # fail_after_tokens=2: the role event and two tokens went out before the failure.
    assert (outcome.status, outcome.usage_seen, outcome.completion_tokens) == (500, False, 2)
    assert outcome.prompt_tokens == 4 + len(b"hello there") // 4 + 2
    # A stream that ends normally keeps the engine's own count.
    seen.clear()
    r = await http.post("/v1/chat/completions", json={**body, "model": "fake"}, headers=AUTH)
    assert (seen[0].status, seen[0].usage_seen, seen[0].completion_tokens) == (200, True, 5)


@pytest.mark.parametrize(("mode", "reserved"), [("engine", 2 + 9), ("estimate", (4 + len(b"hello there") // 4 + 2) + 9)])
async def test_token_reservation_counts_the_prompt_as_configured(engines, tmp_path, mode, reserved) -> None:
    from gateway.governance.limits import Limits

    settings = GatewaySettings(api_keys=[KEY], home=tmp_path, prompt_token_count=mode)
    app = create_app(settings, ModelBackend(engines))
    record, key = app.state.governance.store.create_key(name="t", limits=Limits(tpm=1000))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        r = await http.post("/v1/chat/completions", json={"model": "fake", "messages": MSG, "max_tokens": 9},
                            headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    # The fake engine counts a prompt in words: "hello there" is 2.
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 1000 - reserved


async def test_overload_is_503_with_retry_after(engines, http) -> None:
    engines["fake"].cfg.max_running = 0
    r = await http.post("/v1/chat/completions", json={"model": "fake", "messages": MSG}, headers=AUTH)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "engine_overloaded"


async def test_health_ready_and_unknown_routes(http) -> None:
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/ready")).json()["status"] == "ready"
    r = await http.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await http.get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


async def test_admission_is_exact_under_a_burst_and_released(engines, http) -> None:
    """50 requests at once against room for 10: exactly 10 run, 40 get 503, nothing leaks."""
    import asyncio

    fake = engines["fake"]
    fake.cfg.max_running = 10
    fake.cfg.ttft_ms = 50
    bodies = [{"model": "fake", "messages": MSG, "max_tokens": 2, "stream": i % 2 == 0} for i in range(50)]
    responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=b, headers=AUTH) for b in bodies))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10 and codes.count(503) == 40
    assert fake.stats().running == 0
    # A stream handed out but never iterated is released once dropped.
    stream = await fake.generate("chat", {"messages": MSG, "stream": True, "max_tokens": 1}, "dropped")
    assert fake.stats().running == 1
    del stream
    import gc

    gc.collect()
    assert fake.stats().running == 0
