"""OpenAI's Responses API (`POST /v1/responses`) on the real stack (Serve + vLLM + Redis), through the official
`openai` client with strict response validation: responses, typed stream events, quotas and the ledger."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import LiveStack


@pytest.fixture
def limited(stack: LiveStack) -> tuple[str, openai.OpenAI]:
    r = stack.admin("POST", "/admin/keys", json={"name": "responses", "allowed_models": ["chat"],
                                                  "limits": {"rpm": 10, "tpm": 100_000}})
    assert r.status_code == 201, r.text
    client = openai.OpenAI(api_key=r.json()["key"], base_url=stack.base_url + "/v1", max_retries=0,
                           _strict_response_validation=True, timeout=120)
    return r.json()["id"], client


def test_a_response_is_reserved_at_vllm_s_exact_count_and_charged_its_usage(
        stack: LiveStack, limited: tuple[str, openai.OpenAI]) -> None:
    key_id, client = limited
    raw = client.responses.with_raw_response.create(model="chat", instructions="You are terse.",
                                                    input="Say something.", max_output_tokens=8)
    resp = raw.parse()
    assert resp.model == stack.model and resp.output_text
    assert 0 < resp.usage.output_tokens <= 8 and resp.usage.input_tokens > 0
    assert raw.headers["x-raygate-model-version"].startswith(stack.model + "@")
    # `prompt_token_count: engine`: vLLM's own rendering of the input (its template) + max_output_tokens.
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100_000 - (resp.usage.input_tokens + 8)
    rows = stack.usage_rows(key_id, 1)
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (resp.usage.input_tokens,
                                                                        resp.usage.output_tokens)


def test_a_streamed_response_of_input_items(stack: LiveStack, limited: tuple[str, openai.OpenAI]) -> None:
    key_id, client = limited
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Say something."}]}]
    with client.responses.stream(model="chat", input=items, max_output_tokens=8) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and final.output_text
    rows = stack.usage_rows(key_id, 1)
    assert rows[0]["completion_tokens"] == final.usage.output_tokens and rows[0]["prompt_tokens"] > 0


def test_refusals_name_their_parameter(stack: LiveStack, limited: tuple[str, openai.OpenAI]) -> None:
    _, client = limited
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="chat", input="hi", previous_response_id="resp_1")
    assert err.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_1")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="chat", input="hi", max_output_tokens=5000)  # past the 1,024-token context
