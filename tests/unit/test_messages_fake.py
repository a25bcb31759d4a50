"""`POST /v1/messages` (Anthropic's Messages API) on the fake engine, driven by the official `anthropic` client
with strict response validation (no HTTP server): answers, streams, Anthropic's error shape, quotas settled."""

from __future__ import annotations

import anthropic
import httpx
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.limits import Limits
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine
from tests.support import settled_outcomes

KEY = "test-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def app(tmp_path):  # noqa: ANN201
    engines = {
        "fake": FakeEngine("fake", FakeEngineConfig(max_model_len=64)),
        "broken": FakeEngine("broken", FakeEngineConfig(fail_rate=1.0, fail_after_tokens=2)),
    }
    return create_app(GatewaySettings(api_keys=[KEY], home=tmp_path, admin_key=ADMIN),
                      ModelBackend(engines, aliases={"chat": "fake"}))


@pytest.fixture
def http(app) -> httpx.AsyncClient:  # noqa: ANN001
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def sdk(http: httpx.AsyncClient, **auth: str) -> anthropic.AsyncAnthropic:
    """The official client on the same app (it speaks `httpx2`, the SDK's own fork of httpx)."""
    transport = httpx2.ASGITransport(app=http._transport.app)  # type: ignore[attr-defined]
    return anthropic.AsyncAnthropic(base_url="http://gw", http_client=httpx2.AsyncClient(transport=transport),
                                    max_retries=0, _strict_response_validation=True, **(auth or {"api_key": KEY}))


async def test_a_message_and_its_usage(app, http) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    msg = await sdk(http).messages.create(model="chat", max_tokens=5, messages=MSG, system="be brief")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "fake"
    assert msg.content[0].type == "text" and len(msg.content[0].text.split()) == 5
    assert msg.stop_reason == "max_tokens"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (4, 5)  # the fake counts words, system included
    (outcome,) = seen
    assert (outcome.status, outcome.prompt_tokens, outcome.completion_tokens, outcome.finish_reason) == \
        (200, 4, 5, "max_tokens")
    metrics = (await http.get("/metrics", headers={"authorization": f"Bearer {ADMIN}"})).text
    counted = {tuple(sorted(x.labels.items())): x.value for f in text_string_to_metric_families(metrics)
               for x in f.samples if x.name == "raygate_requests_total"}
    assert counted == {(("endpoint", "messages"), ("model", "chat"), ("status", "200"), ("tier", "default"),
                        ("version", "fake")): 1.0}


async def test_bearer_works_as_well_as_x_api_key(http) -> None:  # noqa: ANN001
    msg = await sdk(http, auth_token=KEY).messages.create(model="fake", max_tokens=2, messages=MSG)
    assert msg.usage.output_tokens == 2


async def test_a_stream_through_the_sdk_and_what_it_is_charged(app, http) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    async with sdk(http).messages.stream(model="fake", max_tokens=6, messages=MSG,
                                         stop_sequences=["tok5 "]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text and "tok5" not in text
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "tok5 "
    assert final.usage.output_tokens == len(text.split())
    (outcome,) = seen
    assert (outcome.usage_seen, outcome.prompt_tokens, outcome.completion_tokens) == (True, 2, len(text.split()))


async def test_a_stream_that_fails_midway_ends_with_anthropic_s_error_event_and_is_charged_what_was_sent(
        app, http) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    r = await http.post("/v1/messages", headers={"x-api-key": KEY},
                        json={"model": "broken", "max_tokens": 5, "messages": MSG, "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1].startswith("event: error\ndata: ") and "[DONE]" not in r.text
    assert '"type":"error","error":{"type":"api_error"' in events[-1]
    with pytest.raises(anthropic.APIStatusError):
        async with sdk(http).messages.stream(model="broken", max_tokens=5, messages=MSG) as stream:
            [t async for t in stream.text_stream]
    outcome = seen[0]
    assert (outcome.status, outcome.usage_seen, outcome.completion_tokens) == (500, False, 2)


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"model": "fake", "messages": MSG}, 400, "invalid_request_error"),  # max_tokens is required
    ({"model": "fake", "max_tokens": 0, "messages": MSG}, 400, "invalid_request_error"),
    ({"model": "fake", "max_tokens": 5, "messages": []}, 400, "invalid_request_error"),
    ({"model": "fake", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400,
     "invalid_request_error"),
    ({"model": "nope", "max_tokens": 5, "messages": MSG}, 404, "not_found_error"),
    ({"model": "fake", "max_tokens": 500, "messages": MSG}, 400, "invalid_request_error"),  # past the context
])
async def test_bad_input_gets_anthropic_s_error_shape(http, body, status, kind) -> None:  # noqa: ANN001
    r = await http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == kind and doc["error"]["message"], doc
    assert set(doc) == {"type", "error", "request_id"}


async def test_auth_and_the_sdk_s_errors(http) -> None:  # noqa: ANN001
    with pytest.raises(anthropic.AuthenticationError) as err:
        await sdk(http, api_key="wrong-key-0123456789").messages.create(model="fake", max_tokens=2, messages=MSG)
    assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    r = await http.post("/v1/messages", json={"model": "fake", "max_tokens": 2, "messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        await sdk(http).messages.create(model="nope", max_tokens=2, messages=MSG)
    r = await http.post("/v1/messages", content=b"{not json", headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["type"] == "error"
    # Every other route keeps OpenAI's envelope.
    r = await http.post("/v1/chat/completions", json={"model": "fake"}, headers={"x-api-key": KEY})
    assert r.status_code == 400 and set(r.json()) == {"error"}


async def test_quotas_reserve_the_messages_shape(tmp_path) -> None:  # noqa: ANN001
    app = create_app(GatewaySettings(api_keys=[KEY], home=tmp_path, prompt_token_count="estimate"),
                     ModelBackend({"fake": FakeEngine("fake", FakeEngineConfig(max_model_len=4096))}))
    _, key = app.state.governance.store.create_key(name="t", limits=Limits(tpm=10_000, rpm=2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        tools = [{"name": "get_weather", "description": "The weather in a city.",
                  "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
        body = {"model": "fake", "max_tokens": 100, "system": "x" * 400, "tools": tools,
                "messages": [*MSG, {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "y" * 400}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                  "content": [{"type": "text", "text": "z" * 400}]}]}]}
        r = await http.post("/v1/messages", json=body, headers={"x-api-key": key})
        assert r.status_code == 200, r.text
        reserved = 10_000 - int(r.headers["x-ratelimit-remaining-tokens"])  # nothing settled yet in this window
        # The answer, then the system prompt, the tool_use input and the tool_result text (400 characters
        # each), then the tool schema and framing.
        assert 100 + 3 * 100 + 25 < reserved < 100 + 3 * 100 + 80, reserved
        r = await http.post("/v1/messages", json=body, headers={"x-api-key": key})
        r = await http.post("/v1/messages", json=body, headers={"x-api-key": key})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"]


async def test_count_tokens_is_the_engine_s_count_and_one_request(tmp_path) -> None:  # noqa: ANN001
    app = create_app(GatewaySettings(api_keys=[KEY], home=tmp_path),
                     ModelBackend({"fake": FakeEngine("fake", FakeEngineConfig())}, aliases={"chat": "fake"}))
    _, key = app.state.governance.store.create_key(name="t", allowed_models=["chat"], limits=Limits(rpm=2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        counted = await sdk(http, api_key=key).messages.count_tokens(model="chat", messages=MSG, system="be brief")
        assert counted.input_tokens == 4  # the fake engine counts words: "be brief" + "hello there"
        r = await http.post("/v1/messages/count_tokens", headers={"x-api-key": key},
                            json={"model": "fake", "messages": MSG})  # not on the key's list
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = await http.post("/v1/messages/count_tokens", headers={"x-api-key": key},
                            json={"model": "chat", "messages": MSG})  # the key's rpm of 2 is spent
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        r = await http.post("/v1/messages/count_tokens", headers={"x-api-key": key}, json={"model": "chat"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
