"""Every request shape either endpoint accepts is bounded by what it reserves, or refused naming its parameter.

The typed request is what quotas count and what the engine receives (`engine_body`): no shape can reserve
less than it makes the engine do, and no value the schema coerced reaches the engine uncoerced.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.governance.quota_policy import Demand, reservation
from gateway.protocol import MAX_JSON_DEPTH, ensure_shallow, too_deep, validate
from serve.errors import InvalidRequest

MSG = [{"role": "user", "content": "x" * 40}]  # 10 tokens by the estimate, +4 framing, +2 for the reply
CHAT_PROMPT = 2 + 4 + 10


@pytest.mark.parametrize(
    ("body", "demand"),
    [
        ({"messages": MSG, "max_tokens": 16, "n": 2}, Demand(CHAT_PROMPT, n=2, max_new_tokens=16)),
        ({"messages": MSG, "max_tokens": 16, "n": "2"}, Demand(CHAT_PROMPT, n=2, max_new_tokens=16)),
        # vLLM's precedence on chat: max_completion_tokens over max_tokens
        ({"messages": MSG, "max_tokens": 100, "max_completion_tokens": 5}, Demand(CHAT_PROMPT, max_new_tokens=5)),
        ({"messages": MSG}, Demand(CHAT_PROMPT)),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 8}, {"type": "image_url"}]}]},
         Demand(2 + 4 + 2)),
    ],
)
def test_chat_shapes(body: dict[str, Any], demand: Demand) -> None:
    typed = validate("chat", {"model": "m", **body})
    assert typed.demand() == demand
    assert typed.engine_body().get("n", 1) == demand.n and isinstance(typed.engine_body().get("n", 1), int)


@pytest.mark.parametrize(
    ("body", "demand"),
    [
        ({"prompt": "abcd" * 3, "max_tokens": 5}, Demand(3 + 1, max_new_tokens=5)),
        # vLLM ignores max_completion_tokens on completions: max_tokens is what bounds the work
        ({"prompt": "abcd", "max_tokens": 200, "max_completion_tokens": 1}, Demand(2, max_new_tokens=200)),
        ({"prompt": "abcd"}, Demand(2, max_new_tokens=16)),  # OpenAI's and vLLM's default
        ({"prompt": "abcd", "max_tokens": None}, Demand(2)),  # to the end of the context
        ({"prompt": ["abcd"] * 6, "max_tokens": 10, "n": 2}, Demand(12, prompts=6, n=2, max_new_tokens=10)),
        ({"prompt": [1, 2, 3], "max_tokens": 4}, Demand(3, max_new_tokens=4)),
        ({"prompt": [[1, 2], [3]], "max_tokens": 4, "best_of": 1}, Demand(3, prompts=2, max_new_tokens=4)),
        ({"prompt": "abcd", "max_tokens": 4, "echo": True, "logprobs": 5}, Demand(2, max_new_tokens=4)),
    ],
)
def test_completion_shapes(body: dict[str, Any], demand: Demand) -> None:
    assert validate("completion", {"model": "m", **body}).demand() == demand


def test_a_batch_reserves_every_prompt_and_counts_one_request_a_prompt() -> None:
    d = validate("completion", {"model": "m", "prompt": ["abcd"] * 6, "max_tokens": 100, "n": 2}).demand()
    assert (d.prompts, d.sequences) == (6, 12)
    assert reservation(d, 2048) == 12 + 12 * 100


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("completion", {"prompt": "a", "best_of": 1000}, "best_of"),
        ("chat", {"messages": MSG, "n": 129}, "n"),
        ("chat", {"messages": MSG, "n": "two"}, "n"),
        ("chat", {"messages": MSG, "max_tokens": 0}, "max_tokens"),
        ("completion", {"prompt": "a", "logprobs": 6}, "logprobs"),
        ("completion", {"prompt": []}, "prompt"),
        ("completion", {"prompt": [1, "a"]}, "prompt"),
    ],
)
def test_shapes_that_cannot_be_bounded_are_refused_naming_the_parameter(endpoint, body, param) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate(endpoint, {"model": "m", **body})
    assert err.value.param == param and err.value.status == 400


def test_nesting_is_bounded_without_recursion() -> None:
    deep: Any = "x"
    for _ in range(5000):  # far past Python's recursion limit
        deep = [deep]
    assert too_deep({"messages": [{"role": "user", "content": [{"type": "text", "text": deep}]}]})
    with pytest.raises(InvalidRequest):
        ensure_shallow({"a": deep})
    shallow: Any = 1
    for _ in range(MAX_JSON_DEPTH):  # exactly the limit: accepted
        shallow = {"k": shallow}
    assert not too_deep(shallow)
    assert too_deep({"k": shallow})


def test_tool_definitions_and_calls_count_in_the_prompt() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "x" * 400}}}}}
    bare = validate("chat", {"model": "m", "messages": MSG}).demand().prompt_tokens
    with_tools = validate("chat", {"model": "m", "messages": MSG, "tools": [tool]}).demand().prompt_tokens
    assert with_tools - bare > 100
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "y" * 400}}]}
    assert validate("chat", {"model": "m", "messages": [*MSG, call]}).demand().prompt_tokens - bare > 100
