"""Conversation routing on real Serve + HAProxy: every turn of a conversation reaches one gateway replica.

Two gateway replicas (fake engine) behind Serve's HAProxy with `conversation_routing` on: HAProxy
asks the router deployment for each POST's replica, which ranks replicas with the pure policy
(`gateway.routing.affinity`). The replica that answered comes back in `x-raygate-replica`.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from gateway.routing.affinity import conversation_key, rank_replicas
from tests.support import PrivateRedis, free_ports

pytestmark = pytest.mark.integration

PORT, DASHBOARD_PORT, METRICS_PORT = free_ports(3)
KEY = "affinity-key-0123456789abcdef"


@dataclass
class _Up:
    base_url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Up]:
    redis = PrivateRedis(tmp_path_factory.mktemp("affinity-redis")).start()  # the two replicas share quotas
    # `raygate up` in a process of its own, as a user runs it: Serve reads its HAProxy flags when first
    # imported, which this test process did at collection, before any stack set them.
    home = tmp_path_factory.mktemp("affinity")
    (home / "raygate.yaml").write_text(yaml.safe_dump({
        "gateway": {
            "num_replicas": 2, "num_cpus": 0.25,
            "conversation_routing": {"enabled": True, "replica_header": True, "stats_period_s": 0.5},
            "settings": {"home": str(home), "api_keys": [KEY], "redis_url": redis.url},
        },
        "serve": {"models": [{"model": "chat", "engine": "fake", "num_cpus": 0}]},
    }))
    exe = Path(sys.executable).with_name("raygate")
    log = open(home / "up.log", "wb")  # noqa: SIM115 - open for the stack's lifetime
    proc = subprocess.Popen(
        [str(exe), "--home", str(home), "up", "--config", str(home / "raygate.yaml"), "--port", str(PORT),
         "--dashboard-port", str(DASHBOARD_PORT), "--metrics-port", str(METRICS_PORT)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    running = _Up(f"http://127.0.0.1:{PORT}", proc)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (home / "up.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{running.base_url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise AssertionError("raygate up not ready: " + (home / "up.log").read_text()[-3000:])
        _wait_for_routing(running)
        yield running
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        redis.stop()


def _wait_for_routing(up: _Up, timeout_s: float = 120) -> None:
    """HAProxy asks the routers once a config reload lists them, seconds after the app is ready; connections
    opened before that reload stay with the old HAProxy process. Wait for three sticky checks in a row."""
    deadline = time.monotonic() + timeout_s
    body = {"model": "chat", "max_tokens": 1, "messages": [{"role": "user", "content": "warm-up"}]}
    streak = 0
    while streak < 3:
        assert time.monotonic() < deadline, "HAProxy never routed through the conversation routers"
        with httpx.Client(base_url=up.base_url, headers={"authorization": f"Bearer {KEY}"}) as c:
            sticky = len(_routers()) == 2 and len(
                {c.post("/v1/chat/completions", json=body).headers["x-raygate-replica"] for _ in range(8)}) == 1
        streak = streak + 1 if sticky else 0
        time.sleep(2)


def _client(up: _Up) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{up.base_url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _replica_ids(up: _Up) -> list[str]:
    seen: set[str] = set()
    with httpx.Client(base_url=up.base_url, headers={"authorization": f"Bearer {KEY}"}) as c:
        for i in range(40):  # distinct conversations reach both replicas
            r = c.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": f"probe {i}"}]})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-raygate-replica"])
    assert len(seen) == 2, f"40 conversations all went to {seen}"
    return sorted(seen)


def _routers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "ServeReplica:raygate:gateway-router" in " ".join(p.info["cmdline"] or [])]


def test_every_turn_of_a_conversation_reaches_the_replica_the_policy_picks(up: _Up) -> None:
    client = _client(up)
    replicas = _replica_ids(up)
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


def test_prompt_cache_key_and_session_header_pin_unrelated_requests(up: _Up) -> None:
    client = _client(up)
    replicas = _replica_ids(up)
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


def test_bad_bodies_still_get_openai_errors_through_the_router(up: _Up) -> None:
    with httpx.Client(base_url=up.base_url, headers={"authorization": f"Bearer {KEY}"}) as c:
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/chat/completions", json={"model": "chat", "messages": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}],
                                                 "prompt_cache_key": 7})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_cache_key"


def test_losing_a_router_replica_fails_no_request(up: _Up) -> None:
    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=up.base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": f"load {i}"}]})
                codes.append(r.status_code)
                i += 1

    routers = _routers()
    assert len(routers) == 2, "RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE=2: two routers beside the proxy"
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(1)
        routers[0].kill()  # a router process dies mid-traffic
        time.sleep(4)
    finally:
        stop.set()
        worker.join(30)
    assert len(codes) > 50 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
