"""The gateway deployment scales with load from its Serve config, and back down (fake engine, real Serve)."""

from __future__ import annotations

import pytest

from tests.integration.scaling import ClosedLoad, running_replicas
from tests.support import PrivateRedis, free_ports, wait_until

pytestmark = pytest.mark.integration

PORT, DASHBOARD_PORT, METRICS_PORT = free_ports(3)


def test_gateway_scales_up_under_load_and_back_down(tmp_path, private_redis: PrivateRedis) -> None:
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
            "settings": {"home": str(tmp_path), "api_keys_file": str(tmp_path / "keys"), "redis_url": private_redis.url},
        },
        "serve": {"models": [{"model": "slow", "engine": "fake", "num_cpus": 0,
                              "fake": {"ttft_ms": 50, "itl_ms": 50}}]},
    })
    stack = Stack(cfg, port=PORT, dashboard_port=DASHBOARD_PORT, metrics_export_port=METRICS_PORT, num_cpus=2)
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20}
    try:
        stack.start(ready_timeout_s=180)
        assert running_replicas("gateway") == 1
        with ClosedLoad(stack.base_url, key, body, workers=12) as load:
            assert wait_until(lambda: running_replicas("gateway") >= 2, 90), \
                "no second replica under 12 concurrent requests with target 2"
        assert wait_until(lambda: running_replicas("gateway") == 1, 90), "did not scale back down when idle"
        assert load.codes and set(load.codes) == {200}, load.outcomes()
    finally:
        stack.stop()
