"""The gateway deployment scales with load from its Serve config, and back down (fake engine, real Serve)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

PORT, DASHBOARD_PORT, METRICS_PORT = 18400, 18465, 18480
REDIS_URL = "redis://127.0.0.1:6379/12"  # several replicas share quotas: a Redis DB of this test's own


def _running(app: str = "raygate") -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["gateway"]
    return sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def test_gateway_scales_up_under_load_and_back_down(tmp_path) -> None:
    from gateway.config import AppConfig
    from raygate.stack import Stack

    key = "autoscale-key-0123456789abcdef"
    (tmp_path / "keys").write_text(key + "\n")
    cfg = AppConfig.load({
        "gateway": {
            "num_cpus": 0.5,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                            "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                            "look_back_period_s": 2},
            "settings": {"home": str(tmp_path), "api_keys_file": str(tmp_path / "keys"), "redis_url": REDIS_URL},
        },
        "serve": {"models": [{"model": "slow", "engine": "fake", "num_cpus": 0,
                              "fake": {"ttft_ms": 50, "itl_ms": 50}}]},
    })
    stack = Stack(cfg, port=PORT, dashboard_port=DASHBOARD_PORT, metrics_export_port=METRICS_PORT, num_cpus=2)
    stop = threading.Event()
    codes: list[int] = []

    async def load() -> None:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60,
                                     headers={"authorization": f"Bearer {key}"}) as c:
            async def worker() -> None:
                while not stop.is_set():
                    r = await c.post("/v1/chat/completions", json={
                        "model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20})
                    codes.append(r.status_code)

            await asyncio.gather(*(worker() for _ in range(12)))

    try:
        stack.start(ready_timeout_s=180)
        assert _running() == 1
        loader = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
        loader.start()
        deadline = time.monotonic() + 90
        while _running() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running() == 2, "no second replica under 12 concurrent requests with target 2"
        stop.set()
        loader.join(60)
        deadline = time.monotonic() + 90
        while _running() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running() == 1, "did not scale back down when idle"
        assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    finally:
        stop.set()
        stack.stop()
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
