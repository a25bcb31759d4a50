"""Conversation routing on real Serve + HAProxy: every turn of a conversation reaches one gateway replica.

Two gateway replicas (fake engine) behind Serve's HAProxy with `conversation_routing` on: HAProxy
asks the router deployment for each POST's replica, which ranks replicas with the pure policy
(`gateway.governance.affinity`). The replica that answered comes back in `x-raygate-replica`.
"""

from __future__ import annotations

from collections import defaultdict

import httpx
import openai
import pytest

from gateway.governance.affinity import conversation_key, rank_replicas

pytestmark = pytest.mark.integration

PORT, DASHBOARD_PORT, METRICS_PORT = 18500, 18565, 18580
REDIS_URL = "redis://127.0.0.1:6379/11"  # two replicas share quotas: a Redis DB of this test's own
KEY = "affinity-key-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from gateway.config import AppConfig
    from raygate.stack import Stack

    home = tmp_path_factory.mktemp("affinity")
    (home / "keys").write_text(KEY + "\n")
    cfg = AppConfig.load({
        "gateway": {
            "num_replicas": 2, "num_cpus": 0.25,
            "conversation_routing": {"enabled": True, "replica_header": True, "stats_period_s": 0.5},
            "settings": {"home": str(home), "api_keys_file": str(home / "keys"), "redis_url": REDIS_URL},
        },
        "serve": {"models": [{"model": "chat", "engine": "fake", "num_cpus": 0}]},
    })
    stack = Stack(cfg, port=PORT, dashboard_port=DASHBOARD_PORT, metrics_export_port=METRICS_PORT, num_cpus=2)
    try:
        stack.start(ready_timeout_s=180)
        yield stack
    finally:
        stack.stop()
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()


def _client(stack) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _replica_ids(stack) -> list[str]:  # type: ignore[no-untyped-def]
    from ray import serve

    dep = serve.status().applications["raygate"].deployments["gateway"]
    assert sum(dep.replica_states.values()) == 2
    seen: set[str] = set()
    with httpx.Client(base_url=stack.base_url, headers={"authorization": f"Bearer {KEY}"}) as c:
        for i in range(40):  # distinct conversations reach both replicas
            r = c.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": f"probe {i}"}]})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-raygate-replica"])
    assert len(seen) == 2, f"40 conversations all went to {seen}"
    return sorted(seen)


def test_every_turn_of_a_conversation_reaches_the_replica_the_policy_picks(stack) -> None:  # type: ignore[no-untyped-def]
    client = _client(stack)
    replicas = _replica_ids(stack)
    served: dict[int, list[str]] = defaultdict(list)
    for conv in range(12):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"conversation {conv}"}]
        expected = rank_replicas(conversation_key({"model": "chat", "messages": messages}) or "",
                                 dict.fromkeys(replicas, 0), 16)[0]
        for turn in range(4):
            stream = turn % 2 == 1
            raw = client.chat.completions.with_raw_response.create(
                model="chat", messages=messages, max_tokens=4, stream=stream)  # type: ignore[arg-type]
            served[conv].append(raw.headers["x-raygate-replica"])
            parsed = raw.parse()
            reply = "".join(c.choices[0].delta.content or "" for c in parsed) if stream else parsed.choices[0].message.content
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"turn {turn}"}]
        assert served[conv] == [expected] * 4, (conv, served[conv], expected)
    assert {s[0] for s in served.values()} == set(replicas), "12 conversations, one replica: no spreading"


def test_prompt_cache_key_and_session_header_pin_unrelated_requests(stack) -> None:  # type: ignore[no-untyped-def]
    client = _client(stack)
    replicas = _replica_ids(stack)
    for i in range(6):
        key = f"tenant-{i}"
        expected = rank_replicas("k:" + key, dict.fromkeys(replicas, 0), 16)[0]
        got = {client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": f"unrelated question {j}"}], max_tokens=2,
            extra_body={"prompt_cache_key": key}).headers["x-raygate-replica"] for j in range(4)}
        assert got == {expected}, (key, got)
        got = {client.completions.with_raw_response.create(
            model="chat", prompt=f"another prompt {j}", max_tokens=2,
            extra_headers={"x-session-id": f"session-{i}"}).headers["x-raygate-replica"] for j in range(4)}
        assert got == {rank_replicas(f"s:session-{i}", dict.fromkeys(replicas, 0), 16)[0]}


def test_bad_bodies_still_get_openai_errors_through_the_router(stack) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=stack.base_url, headers={"authorization": f"Bearer {KEY}"}) as c:
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/chat/completions", json={"model": "chat", "messages": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}],
                                                 "prompt_cache_key": 7})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_cache_key"
