"""Forced tool calls and JSON schemas on the default model (vLLM, `tool_call_parser: hermes` as `raygate up`
configures it), through the official `openai` and `anthropic` clients: what comes back is parsed by the
client and validated against the schema the request gave, not assumed."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
              "required": ["city"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                         "parameters": PARAMETERS}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(api_key=stack.key, base_url=f"{stack.base_url}/v1", _strict_response_validation=True,
                         max_retries=0, timeout=120)


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_a_forced_tool_call_comes_back_as_tool_calls(client, stack, choice) -> None:  # noqa: ANN001
    resp = client.chat.completions.create(model=stack.model, messages=MSG, tools=[TOOL], tool_choice=choice,
                                          max_tokens=200)
    calls = resp.choices[0].message.tool_calls
    assert calls, resp
    assert all(c.type == "function" and c.function.name == "get_weather" for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_a_forced_tool_call_streams_as_tool_call_deltas(client, stack, choice) -> None:  # noqa: ANN001
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=stack.model, messages=MSG, tools=[TOOL], tool_choice=choice,
                                                max_tokens=200, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.function and delta.function.name:
                names[delta.index] = delta.function.name
            if delta.function and delta.function.arguments:
                arguments[delta.index] = arguments.get(delta.index, "") + delta.function.arguments
    assert names and set(names.values()) == {"get_weather"}, (names, arguments)
    for index in names:
        jsonschema.validate(json.loads(arguments[index]), PARAMETERS)


def test_a_json_schema_response_validates_against_it(client, stack) -> None:  # noqa: ANN001
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Is the sea blue?"}], max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(resp.choices[0].message.content or ""), schema)


def test_a_forced_tool_use_through_anthropic_s_messages(stack) -> None:  # noqa: ANN001
    client = anthropic.Anthropic(base_url=stack.base_url, api_key=stack.key, max_retries=0,
                                 _strict_response_validation=True)
    msg = client.messages.create(
        model=stack.model, max_tokens=200, messages=MSG, tool_choice={"type": "tool", "name": "get_weather"},
        tools=[{"name": "get_weather", "description": "The weather in a city.", "input_schema": PARAMETERS}])
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert uses and all(u.name == "get_weather" for u in uses), msg
    for use in uses:
        jsonschema.validate(use.input, PARAMETERS)
    assert msg.stop_reason == "tool_use"
