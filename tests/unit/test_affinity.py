"""Conversation affinity policy: keys and replica ranking (pure)."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.routing.affinity import PROMPT_KEY_CHARS, conversation_key, rank_replicas

SYSTEM = {"role": "system", "content": "You are terse."}


def _turns(first: str, n: int) -> list[list[dict[str, object]]]:
    """The message lists a client sends over `n` turns of one conversation."""
    msgs: list[dict[str, object]] = [SYSTEM, {"role": "user", "content": first}]
    out = [list(msgs)]
    for i in range(1, n):
        msgs += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"follow-up {i}"}]
        out.append(list(msgs))
    return out


def test_every_turn_of_a_conversation_has_the_same_key() -> None:
    keys = {conversation_key({"model": "m", "messages": m}) for m in _turns("What is 2 plus 3?", 5)}
    assert len(keys) == 1 and None not in keys


def test_different_conversations_and_models_have_different_keys() -> None:
    a = conversation_key({"model": "m", "messages": _turns("first question", 1)[0]})
    b = conversation_key({"model": "m", "messages": _turns("second question", 1)[0]})
    c = conversation_key({"model": "other", "messages": _turns("first question", 1)[0]})
    assert len({a, b, c}) == 3


def test_text_parts_count_like_plain_content() -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]}
    assert conversation_key({"model": "m", "messages": [parts]}) == conversation_key(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )


def test_prompt_cache_key_then_session_then_opening() -> None:
    body = {"model": "m", "messages": _turns("q", 1)[0], "prompt_cache_key": "tenant-7"}
    assert conversation_key(body, "sess") == "k:tenant-7"
    body.pop("prompt_cache_key")
    assert conversation_key(body, "sess") == "s:sess"
    assert conversation_key(body, None).startswith("m:")
    assert conversation_key(None, "sess") == "s:sess"


def test_completion_prompts_key_on_their_opening() -> None:
    shared = "x" * PROMPT_KEY_CHARS
    assert conversation_key({"model": "m", "prompt": shared + "a"}) == conversation_key({"model": "m", "prompt": shared + "b"})
    assert conversation_key({"model": "m", "prompt": ["short"]}) == conversation_key({"model": "m", "prompt": "short"})
    assert conversation_key({"model": "m", "prompt": "a"}) != conversation_key({"model": "m", "prompt": "b"})


@pytest.mark.parametrize("body", [None, {}, {"model": "m"}, {"model": "m", "messages": []},
                                  {"model": "m", "messages": ["not a message"]}, {"model": "m", "prompt": [1, 2, 3]},
                                  {"model": "m", "prompt": ["a", "b"]}, {"model": "m", "prompt_cache_key": ""}])
def test_nothing_to_stick_to(body: dict[str, object] | None) -> None:
    assert conversation_key(body) is None


REPLICAS = [f"replica-{i}" for i in range(4)]


def test_the_same_key_ranks_replicas_the_same_way() -> None:
    loads = dict.fromkeys(REPLICAS, 0)
    first = rank_replicas("conv-1", loads, 16)
    assert sorted(first) == sorted(REPLICAS)
    assert all(rank_replicas("conv-1", dict(reversed(loads.items())), 16) == first for _ in range(3))


def test_keys_spread_evenly_over_replicas() -> None:
    loads = dict.fromkeys(REPLICAS, 0)
    counts = Counter(rank_replicas(f"conversation-{i}", loads, 16)[0] for i in range(4000))
    assert set(counts) == set(REPLICAS)
    assert all(abs(n - 1000) <= 100 for n in counts.values()), counts  # within ±10% of an even share


def test_removing_a_replica_moves_only_its_conversations() -> None:
    loads = dict.fromkeys(REPLICAS, 0)
    before = {i: rank_replicas(f"c{i}", loads, 16)[0] for i in range(2000)}
    smaller = {r: 0 for r in REPLICAS if r != "replica-2"}
    after = {i: rank_replicas(f"c{i}", smaller, 16)[0] for i in range(2000)}
    moved = {i for i in before if before[i] != after[i]}
    assert moved == {i for i in before if before[i] == "replica-2"}


def test_a_busy_replica_is_passed_over_then_taken_back() -> None:
    loads = dict.fromkeys(REPLICAS, 0)
    home = rank_replicas("conv", loads, 4)[0]
    loads[home] = 4  # exactly the gap: still its replica
    assert rank_replicas("conv", loads, 4)[0] == home
    loads[home] = 5
    order = rank_replicas("conv", loads, 4)
    assert order[0] != home and order[-1] == home  # tried last, not dropped
    loads = {r: 5 for r in REPLICAS}  # all equally busy: affinity again
    assert rank_replicas("conv", loads, 4)[0] == home


def test_a_replica_with_a_full_kv_cache_is_passed_over_then_taken_back() -> None:
    loads = dict.fromkeys(REPLICAS, 0)
    home = rank_replicas("conv", loads, 4)[0]
    kv = dict.fromkeys(REPLICAS, 0.3)
    kv[home] = 0.89  # below the ceiling: still its replica
    assert rank_replicas("conv", loads, 4, kv, 0.9)[0] == home
    kv[home] = 0.9
    order = rank_replicas("conv", loads, 4, kv, 0.9)
    assert order[0] != home and order[-1] == home  # tried last, not dropped
    assert rank_replicas("conv", loads, 4, kv, None)[0] == home  # no ceiling: requests in flight alone
    assert rank_replicas("conv", loads, 4, {r: 0.95 for r in REPLICAS}, 0.9)[0] == home  # all full: affinity again
    assert rank_replicas("conv", loads, 4, {}, 0.9)[0] == home  # a replica that reports none counts as empty


def test_no_replicas() -> None:
    assert rank_replicas("conv", {}, 4) == []
