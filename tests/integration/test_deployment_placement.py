"""Models in deployments of their own (`placement: deployment`) on the real stack.

vLLM on the tiny model as `raygate/tiny-chat@stable` (streaming 4 tokens per event, a small KV cache,
autoscaled on it), the same version again as `tiny-chat-pair` in two replicas routed by conversation, and
an autoscaled fake model as `slow@1`, each its own Serve deployment beside the gateway: the OpenAI API
through the handle (official client, streams, errors, disconnects), the names operators see in `serve
status` and `raygate status`, every turn of a conversation reaching the replica whose prefix cache holds
its history (vLLM's own `cached_tokens`), a model deployment scaling up under load and back down while the
gateway stays at one replica, and the vLLM deployment scaling out when its KV cache fills while its request
count stays far below the target (that test runs last: until then it has one replica).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve.hardware import cpu_supports_bf16
from tests.integration.scaling import ClosedLoad, running_replicas
from tests.support import EAGER, free_ports, wait_until

pytestmark = pytest.mark.integration

PORT, DASHBOARD_PORT, METRICS_PORT = free_ports(3)
APP, VLLM_DEP, SLOW_DEP = "raygate", "raygate/tiny-chat@stable", "slow@1"
PAIR, PAIR_DEP = "tiny-chat-pair", "tiny-chat-pair@stable"
TREE = "tiny-chat-tree"  # two replicas routed by Ray Serve LLM's prefix tree (`routing: prefix_tree`)
BLOCK = 128  # vLLM's KV block on CPUs: its prefix cache holds whole blocks
KV_TOKENS = 4096  # the cache holds this many tokens: 4 KiB each in bf16, 8 KiB in the float32 of a CPU without bf16


class _Placed:
    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url, key
        self.loop = asyncio.new_event_loop()  # Serve's handle routes from the loop it was first used on
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, deployment: str, method: str) -> Any:
        from ray import serve

        async def go() -> Any:
            return await getattr(serve.get_deployment_handle(deployment, app_name=APP), method).remote()

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=60)

    def running(self) -> int:
        return sum(s["running"] for s in self.call(VLLM_DEP, "engine_stats").values())

    def wait_idle(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.running() == 0


@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Placed]:
    from gateway.config import AppConfig
    from raygate import home as home_mod
    from raygate.cli import default_app_config
    from raygate.stack import Stack

    home = tmp_path_factory.mktemp("placed-home")
    home_mod.ensure_default_model(home_mod.registry(home))
    _, key = home_mod.ensure_dev_key(home)
    home_mod.ensure_admin_key(home)
    raw = default_app_config(home, "vllm")
    del raw["serve"]["models"][1:]  # the chat model only (embeddings: test_embeddings_vllm)
    # vLLM's stream_interval 4 through engine_kwargs: one event per 4 tokens after the first
    # (test_the_openai_api_through_the_models_deployment sees it across the handle). It scales on its KV cache:
    # 64 requests per replica would never be reached here (test_a_vllm_deployment_scales_out_when_its_kv_cache_fills).
    raw["serve"]["models"][0].update({
        "placement": "deployment", "num_cpus": 0.5,
        "engine_kwargs": {**EAGER, "max_model_len": 2048, "stream_interval": 4,
                          "kv_cache_memory_bytes": KV_TOKENS * (4096 if cpu_supports_bf16() else 8192)},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64,
                        "target_kv_cache_usage": 0.5, "upscale_delay_s": 1, "downscale_delay_s": 4,
                        "metrics_interval_s": 0.5, "look_back_period_s": 2},
    })
    raw["serve"]["models"].append({  # two replicas, each its own engine and prefix cache; routed by conversation
        "model": raw["serve"]["models"][0]["model"], "served_name": PAIR, "placement": "deployment", "num_replicas": 2,
        "num_cpus": 0, "engine_kwargs": {**EAGER, "max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20},
    })
    raw["serve"]["models"].append({**raw["serve"]["models"][-1], "served_name": TREE, "routing": "prefix_tree"})
    raw["serve"]["models"].append({
        "model": "slow@1", "served_name": "slow", "engine": "fake", "placement": "deployment", "num_cpus": 0,
        "fake": {"ttft_ms": 50, "itl_ms": 50},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                        "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2},
    })
    stack = Stack(AppConfig.load(raw), port=PORT, dashboard_port=DASHBOARD_PORT, metrics_export_port=METRICS_PORT,
                  num_cpus=2)
    try:
        stack.start(ready_timeout_s=420)
        yield _Placed(stack.base_url, key)
    finally:
        stack.stop()


def test_each_model_is_a_named_deployment_the_operator_sees(placed: _Placed) -> None:
    from ray import serve

    def statuses() -> dict[str, str]:
        deployments = serve.status().applications[APP].deployments
        return {name: str(getattr(d.status, "value", d.status)) for name, d in deployments.items()}

    assert {"gateway", VLLM_DEP, PAIR_DEP, SLOW_DEP} <= set(statuses()), statuses()
    # `/ready` is the engines' readiness; Serve's controller may report a deployment's status a moment later.
    assert wait_until(lambda: set(statuses().values()) == {"HEALTHY"}, 60, every_s=0.5), statuses()
    exe = [str(Path(sys.executable).parent / "raygate"), "status", "--dashboard-port", str(DASHBOARD_PORT)]
    status = subprocess.run(exe, check=False, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"deployment {VLLM_DEP}: HEALTHY" in status.stdout, status.stdout
    assert "engine raygate/tiny-chat@1: variant full, running 0, healthy" in status.stdout, status.stdout
    assert f"deployment {SLOW_DEP}: HEALTHY" in status.stdout


def test_the_openai_api_through_the_models_deployment(placed: _Placed) -> None:
    client = openai.OpenAI(api_key=placed.key, base_url=placed.base_url + "/v1", max_retries=0,
                           _strict_response_validation=True)
    assert {m.id for m in client.models.list().data} == {"raygate/tiny-chat", PAIR, TREE, "slow"}
    raw = client.chat.completions.with_raw_response.create(
        model="raygate/tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    assert raw.headers["x-raygate-model-version"] == "raygate/tiny-chat@1"
    assert raw.parse().usage.completion_tokens == 5
    messages = [{"role": "user", "content": "def f("}]
    chunks = list(client.chat.completions.create(model="raygate/tiny-chat", messages=messages, max_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    same = client.chat.completions.create(model="raygate/tiny-chat", messages=messages, max_tokens=24, temperature=0)
    assert same.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # stream_interval 4: the first token goes at once, then events of 4 tokens (logprobs count them).
    per_event = [len(c.choices[0].logprobs.content) for c in client.chat.completions.create(
        model="raygate/tiny-chat", messages=messages, max_tokens=24, temperature=0, stream=True, logprobs=True)
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content]
    # vLLM merges the outputs its handler has not relayed yet (a busy host: 8 tokens in one event), so every event
    # between the first and the last carries a multiple of 4; without stream_interval each would carry one.
    assert per_event[0] == 1 and sum(per_event) == 24 and len(per_event) <= 8, per_event
    assert all(n % 4 == 0 for n in per_event[1:-1]), per_event
    # The engine's own errors keep their status, param and code across the handle.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="raygate/tiny-chat", prompt="x", max_tokens=5000)
    assert info.value.status_code == 400 and info.value.body["param"] is not None
    r = httpx.post(placed.base_url + "/v1/completions", headers={"authorization": f"Bearer {placed.key}"},
                   json={"model": "raygate/tiny-chat", "prompt": "x", "max_tokens": 5000})
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_leaving_aborts_the_request_in_the_models_replica(placed: _Placed) -> None:
    placed.wait_idle()
    # 2,000 tokens take about 2.7 s here (900 took 1.2 s: one stall on a loaded CI machine and the request had
    # ended before the check, so the test proved nothing and failed); the client leaves after the first event.
    body = {"model": "raygate/tiny-chat", "prompt": "a", "max_tokens": 2000, "min_tokens": 2000, "stream": True}
    auth = {"authorization": f"Bearer {placed.key}"}
    with (httpx.Client(base_url=placed.base_url, timeout=60, headers=auth) as c,
          c.stream("POST", "/v1/completions", json=body) as r):
        lines = r.iter_lines()
        first = next((line for line in lines if line.startswith("data: ")), None)
        if placed.running() != 1:  # say what the client got: a rare CI failure here is not yet explained
            rest = list(lines) if first is not None else []
            pytest.fail(f"the request ended before the client left: status {r.status_code}, request id "
                        f"{r.headers.get('x-request-id')}, first event {str(first)[:200]}, then {len(rest)} lines "
                        f"ending {rest[-3:]}")
    started = time.monotonic()
    placed.wait_idle(timeout_s=10)
    assert time.monotonic() - started < 3, "aborted only after the tokens ran out"


def test_a_model_deployment_scales_up_under_load_and_back_down(placed: _Placed) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True}
    assert running_replicas(SLOW_DEP) == 1
    with ClosedLoad(placed.base_url, placed.key, body, workers=12) as load:
        assert wait_until(lambda: running_replicas(SLOW_DEP) >= 2, 90), \
            "no second replica of slow@1 under 12 concurrent requests with target 2"
        assert running_replicas("gateway") == 1 and running_replicas(VLLM_DEP) == 1  # only the loaded model scaled
    assert wait_until(lambda: running_replicas(SLOW_DEP) == 1, 90), "did not scale back down when idle"
    assert load.codes and set(load.codes) == {200}, load.outcomes()


def _conversations(client: openai.OpenAI, tag: str, turns: int, per_turn_key: bool,
                   model: str = PAIR) -> list[list[tuple[int, int]]]:
    """Four multi-turn conversations (a long opening of their own, growing histories) through `model`:
    each turn's (prompt tokens, vLLM's cached prompt tokens). `per_turn_key`: every turn sends a
    `prompt_cache_key` of its own, so the router sees unrelated requests (what a load-only router does)."""
    out = []
    for c in range(4):
        words = " ".join(f"{tag}{c}w{i}" for i in range(120))  # well over two KV blocks, unique per conversation
        messages: list[dict[str, str]] = [{"role": "system", "content": f"Context {tag}-{c}: {words}"},
                                          {"role": "user", "content": "Start."}]
        turns_seen = []
        for t in range(turns):
            extra = {"prompt_cache_key": f"{tag}-{c}-{t}"} if per_turn_key else {}
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                   extra_body=extra)
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            turns_seen.append((reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens or 0))
            messages += [{"role": "assistant", "content": reply.choices[0].message.content or "."},
                         {"role": "user", "content": f"Go on with part {t} of {tag}-{c}, please, in more detail."}]
        out.append(turns_seen)
    return out


def test_each_conversation_reaches_the_replica_that_cached_its_history(placed: _Placed) -> None:
    """`routing: conversation` (the default): every turn after the first finds the whole blocks of the previous
    turn's prompt in the prefix cache of the replica it reaches. The same workload with a key per turn (the router
    blind to the conversation) is the baseline, measured in the same run."""
    client = openai.OpenAI(api_key=placed.key, base_url=placed.base_url + "/v1", max_retries=0,
                           _strict_response_validation=True)
    turns = 4
    sticky = _conversations(client, "sticky", turns, per_turn_key=False)
    for conversation in sticky:
        assert conversation[0][1] == 0  # a new opening: nothing cached anywhere
        for (before, _), (_, cached) in zip(conversation, conversation[1:], strict=False):
            assert cached >= before // BLOCK * BLOCK, conversation  # the previous prompt's blocks, all of them
    blind = _conversations(client, "blind", turns, per_turn_key=True)
    later = [turn for conversation in sticky for turn in conversation[1:]]
    later_blind = [turn for conversation in blind for turn in conversation[1:]]
    rate = sum(c for _, c in later) / sum(p for p, _ in later)
    rate_blind = sum(c for _, c in later_blind) / sum(p for p, _ in later_blind)
    print(f"prefix-cache hit rate of turns 2-{turns}: by conversation {rate:.2f}, a key per turn {rate_blind:.2f}")
    assert rate >= rate_blind


def test_the_prefix_tree_sends_each_turn_to_the_replica_that_cached_its_history(placed: _Placed) -> None:
    """`routing: prefix_tree`: Ray Serve LLM's router matches each prompt (the gateway's `PromptBody`) against what
    it sent to each replica; every turn after the first finds the previous turn's blocks cached where it lands. A
    router blind to the history (two replicas, idle) would miss about half of these turns."""
    client = openai.OpenAI(api_key=placed.key, base_url=placed.base_url + "/v1", max_retries=0,
                           _strict_response_validation=True)
    for conversation in _conversations(client, "tree", 4, per_turn_key=False, model=TREE):
        assert conversation[0][1] == 0
        for (before, _), (_, cached) in zip(conversation, conversation[1:], strict=False):
            assert cached >= before // BLOCK * BLOCK, conversation


def test_a_vllm_deployment_scales_out_when_its_kv_cache_fills(placed: _Placed) -> None:
    """Four long requests fill `raygate/tiny-chat`'s cache (4,096 tokens) while 4 in flight is far below its target of
    64: only the KV signal (vLLM's own kv_cache_usage, through the replica's autoscaling stats) asks for a
    second replica. When the load ends the cache empties and the deployment goes back to one."""
    assert running_replicas(VLLM_DEP) == 1
    prompt = " ".join(f"w{i}" for i in range(300))
    body = {"model": "raygate/tiny-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1200, "min_tokens": 1200,
            "stream": True}
    usage: list[float] = []

    def fuller() -> bool:
        usage.append(max(s["kv_cache_usage"] for s in placed.call(VLLM_DEP, "engine_stats").values()))
        return usage[-1] >= 0.5

    with ClosedLoad(placed.base_url, placed.key, body, workers=4) as load:
        assert wait_until(fuller, 120, every_s=0.5), f"the KV cache never filled: {usage[-10:]}"
        assert wait_until(lambda: running_replicas(VLLM_DEP) >= 2, 240), \
            f"no second replica of {VLLM_DEP} with its KV cache at {usage[-1]:.2f} (target 0.5)"
        assert running_replicas(SLOW_DEP) == 1 and running_replicas(PAIR_DEP) == 2
    assert wait_until(lambda: running_replicas(VLLM_DEP) == 1, 120), "did not scale back in when the cache emptied"
    assert load.codes and set(load.codes) == {200}, load.outcomes()
