"""One real stack per test session: local Ray, Serve, the gateway, vLLM on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import EAGER, PrivateRedis, free_ports

PORT, DASHBOARD_PORT, METRICS_PORT = free_ports(3)
TP_MODEL = "tiny-chat-tp2"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's shared stack after every other integration test: the shared stack holds this
    process's Ray connection until the session ends, and a module that starts its own stack in this process
    (`Stack.start` calls `ray.init`) must run before it starts, whatever the modules' names."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in item.path.parents]
    ordered = sorted((items[i] for i in slots), key=lambda item: "stack" in getattr(item, "fixturenames", ()))
    for i, item in zip(slots, ordered, strict=True):
        items[i] = item


@dataclass
class LiveStack:
    base_url: str
    key: str
    model: str
    embed_model: str
    home: Path
    admin_key: str
    otlp: Any = None
    metrics_port: int = METRICS_PORT
    handle_loop: Any = field(default=None, init=False)

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        """An admin API call with the stack's admin key."""
        import httpx

        return httpx.request(method, self.base_url + path, headers={"authorization": f"Bearer {self.admin_key}"},
                             timeout=30, **kw)

    def usage_rows(self, key_id: str, count: int = 1, timeout_s: float = 10.0) -> list[dict]:
        """The key's ledger rows once they count `count` requests (a row is written as a request ends on the
        server, which the client may see first), or what there is after `timeout_s`."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.admin("GET", f"/admin/usage?key_id={key_id}").json()["data"]
            if sum(r["requests"] for r in rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)

    def engine_stats(self) -> dict:
        """Load of each engine by version, from the gateway replica (from sync and async tests alike).

        Serve's handle routes from the event loop it was first used on; one loop of our own,
        in a thread, serves every call.
        """
        import asyncio

        from ray import serve

        async def call() -> dict:
            return await serve.get_deployment_handle("gateway", app_name="raygate").engine_stats.remote()

        if self.handle_loop is None:
            import threading

            self.handle_loop = asyncio.new_event_loop()
            threading.Thread(target=self.handle_loop.run_forever, daemon=True, name="serve-handle-loop").start()
        return asyncio.run_coroutine_threadsafe(call(), self.handle_loop).result(timeout=30)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, session_redis: PrivateRedis) -> Iterator[LiveStack]:
    from gateway.config import AppConfig
    from raygate import home as home_mod
    from raygate.cli import default_app_config
    from raygate.stack import Stack
    from tests.otlp_receiver import OtlpReceiver

    home = tmp_path_factory.mktemp("raygate-home")
    otlp = OtlpReceiver()
    reg = home_mod.registry(home)
    manifest = home_mod.ensure_default_model(reg)
    embed = home_mod.ensure_embedding_model(reg)
    _, key = home_mod.ensure_dev_key(home)
    _, admin_key = home_mod.ensure_admin_key(home)
    raw = default_app_config(home, "vllm")
    # Quotas shared through a Redis of the session's own, a route with a fallback.
    # Traces exported over OTLP to a receiver in this process; the access log on (test_observability_stack).
    raw["gateway"]["env_vars"] = {
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",  # vLLM's engine core exports too (default grpc)
        "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "raygate-test",
    }
    raw["gateway"]["settings"].update({
        "access_log": True,
        "redis_url": session_redis.url,
        "prompt_token_count": "engine",  # token reservations from vLLM's own count (test_governance_vllm)
        "routes": {"chat": {"targets": [{"model": manifest.name}], "fallbacks": []}},
        # 0.001 a prompt token, 0.0001 one from vLLM's prefix cache, 0.002 a generated one (test_governance_vllm)
        "prices": {manifest.name: {"input": 1000, "cached_input": 100, "output": 2000}},
    })
    # Small limits so saturation is reachable from a test: 4 running + 2 queued.
    model = raw["serve"]["models"][0]
    model.update({"max_queued_requests": 2,
                  "engine_kwargs": {**model["engine_kwargs"], **EAGER, "max_num_seqs": 4, "max_model_len": 1024}})
    raw["serve"]["models"][1]["engine_kwargs"] = EAGER
    # Roll-outs (test_rollout_lifecycle): follow @stable closely and prefer int8 (W8A8 on this CPU).
    raw["serve"]["models"][0].update({"variants": ["int8", "full"], "registry_poll_s": 1.0})
    # The same version split over two tensor-parallel CPU workers (test_parallel_engines).
    raw["serve"]["models"].append({
        "model": f"{manifest.name}@1", "served_name": TP_MODEL, "num_cpus": 0,
        "engine_kwargs": {**EAGER, "max_model_len": 1024, "max_num_seqs": 4, "tensor_parallel_size": 2,
                          "kv_cache_memory_bytes": 256 << 20},
    })
    stack = Stack(AppConfig.load(raw), port=PORT, dashboard_port=DASHBOARD_PORT, metrics_export_port=METRICS_PORT)
    try:
        stack.start(ready_timeout_s=420)
        yield LiveStack(base_url=stack.base_url, key=key, model=manifest.name, embed_model=embed.name, home=home,
                        admin_key=admin_key, otlp=otlp)
    finally:
        stack.stop()
        otlp.close()
