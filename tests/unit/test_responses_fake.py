"""`POST /v1/responses` (OpenAI's Responses API) on the fake engine, driven by the official `openai` client with
strict response validation (no HTTP server): responses, typed stream events, refusals, quotas settled."""

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
def app(tmp_path):  # noqa: ANN001, ANN201
    engines = {
        "fake": FakeEngine("fake", FakeEngineConfig(max_model_len=64)),
        "broken": FakeEngine("broken", FakeEngineConfig(fail_rate=1.0, fail_after_tokens=2)),
    }
    return create_app(GatewaySettings(api_keys=[KEY], home=tmp_path), ModelBackend(engines, aliases={"chat": "fake"}))


@pytest.fixture
def http(app) -> httpx.AsyncClient:  # noqa: ANN001
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.fixture
def client(http) -> openai.AsyncOpenAI:  # noqa: ANN001
    return openai.AsyncOpenAI(api_key=KEY, base_url="http://gw/v1", http_client=http, max_retries=0,
                              _strict_response_validation=True)


async def test_a_response_and_its_usage(app, client) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    resp = await client.responses.create(model="chat", input="hello there", instructions="be brief",
                                         max_output_tokens=5)
    assert resp.object == "response" and resp.model == "fake" and len(resp.output_text.split()) == 5
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (4, 5)  # the fake counts words
    (outcome,) = seen
    assert (outcome.status, outcome.prompt_tokens, outcome.completion_tokens) == (200, 4, 5)


async def test_input_items_and_a_stream_of_typed_events(app, client) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}]
    async with client.responses.stream(model="fake", input=items, max_output_tokens=6) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.status == "incomplete"
    assert kinds.count("response.output_text.delta") == 6
    assert len(final.output_text.split()) == 6 and final.usage.output_tokens == 6
    (outcome,) = seen
    assert (outcome.usage_seen, outcome.prompt_tokens, outcome.completion_tokens) == (True, 2, 6)


async def test_a_stream_that_fails_midway_ends_with_an_error_event_and_is_charged_what_was_sent(
        app, http, client) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    r = await http.post("/v1/responses", headers={"authorization": f"Bearer {KEY}"},
                        json={"model": "broken", "input": "hi", "max_output_tokens": 5, "stream": True})
    assert r.status_code == 200
    last = [e for e in r.text.split("\n\n") if e][-1]
    assert last.startswith("event: error\ndata: ") and '"code":"engine_error"' in last and "[DONE]" not in r.text
    events = [e async for e in await client.responses.create(model="broken", input="hi", max_output_tokens=5,
                                                              stream=True)]
    assert events[-1].type == "error" and events[-1].code == "engine_error"  # the SDK's ResponseErrorEvent
    assert (seen[0].status, seen[0].usage_seen, seen[0].completion_tokens) == (500, False, 2)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "fake"}, 400, "input"),
    ({"model": "fake", "input": []}, 400, "input"),
    ({"model": "fake", "input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": "fake", "input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"model": "fake", "input": "hi", "background": True}, 400, "background"),
    ({"model": "nope", "input": "hi"}, 404, "model"),
    ({"model": "fake", "input": "hi", "max_output_tokens": 500}, 400, "max_output_tokens"),  # past the context
])
async def test_bad_input_gets_the_envelope_naming_the_parameter(http, body, status, param) -> None:  # noqa: ANN001
    r = await http.post("/v1/responses", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


async def test_stored_responses_are_not_there_and_say_why(http, client) -> None:  # noqa: ANN001
    with pytest.raises(openai.NotFoundError) as err:
        await client.responses.retrieve("resp_123")
    assert "does not store responses" in err.value.message
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete("resp_123")
    assert (await http.get("/v1/responses/resp_123")).status_code == 401  # the key first
