"""Autoscaling on the engines' own load (serve/autoscaling_policy.py): the pure decision, Serve's adapter,
the config Serve gets, and the vLLM stat logger that keeps an engine's KV cache use current."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway.builder import model_options
from gateway.config import AppConfig
from serve.autoscaling_policy import KV_CACHE_USAGE_STAT, EngineLoadPolicy, replicas_for_load
from serve.config import AutoscalingConfig
from serve.engine import EngineStats, autoscaling_stats
from serve.engine_metrics import SchedulerLoad
from serve.fake_engine import FakeEngine


def test_requests_decide_until_the_kv_cache_asks_for_more() -> None:
    # Serve's own rule: 3 replicas' worth of requests.
    assert replicas_for_load(192, 64, {"a": 0.2, "b": 0.3}, 0.8) == 3
    # Four long requests fill both caches: the count (4 of 64) asks for nothing, the cache for 2.5 replicas.
    assert replicas_for_load(4, 64, {"a": 1.0, "b": 1.0}, 0.8) == pytest.approx(2.5)
    assert replicas_for_load(4, 64, {"a": 0.4}, 0.8) == pytest.approx(0.5)  # half the target on one: scale in
    assert replicas_for_load(4, 64, {"a": 1.0}, None) == pytest.approx(4 / 64)  # no KV target: requests only
    assert replicas_for_load(4, 64, {}, 0.8) == pytest.approx(4 / 64)  # no engine reports a cache


def _ctx(current: int, requests: float, kv: dict[str, float] | None, running: list[str]) -> Any:
    config = SimpleNamespace(get_target_ongoing_requests=lambda: 8)
    metrics = None if kv is None else {KV_CACHE_USAGE_STAT: kv}
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=current, total_num_requests=requests,
                           aggregated_metrics=metrics, running_replicas=running, config=config)


def test_the_serve_policy_reads_the_running_replicas_reports() -> None:
    policy = EngineLoadPolicy(target_kv_cache_usage=0.5)
    assert policy(_ctx(1, 2, {"r1": 0.9}, ["r1"])) == (pytest.approx(1.8), {})
    assert policy(_ctx(2, 2, {"r1": 0.1, "gone": 1.0}, ["r1", "r2"]))[0] == pytest.approx(0.25)  # a stopped replica's report is left out
    assert policy(_ctx(1, 16, None, ["r1"]))[0] == 2  # nothing reported yet: requests
    assert policy(_ctx(0, 0, None, []))[0] == 0  # scaled to zero: Serve's own cold start decides


def test_serve_gets_the_policy_with_the_fields_it_knows() -> None:
    opts = AutoscalingConfig(min_replicas=1, max_replicas=3, target_kv_cache_usage=0.6).serve_options()
    assert "target_kv_cache_usage" not in opts and opts["max_replicas"] == 3
    assert opts["policy"] == {"policy_function": "serve.autoscaling_policy:EngineLoadPolicy",
                              "policy_kwargs": {"target_kv_cache_usage": 0.6}}
    assert "policy" not in AutoscalingConfig(target_kv_cache_usage=None).serve_options()  # Serve's own policy
    from ray.serve.config import AutoscalingConfig as ServeAutoscaling

    app = AppConfig.load({"serve": {"models": [{"model": "m", "engine": "fake", "placement": "deployment",
                                                "autoscaling": {"max_replicas": 4}}]}})
    serve_cfg = ServeAutoscaling(**model_options(app, app.serve.models[0])["autoscaling_config"])
    assert serve_cfg.policy.policy_function == "serve.autoscaling_policy:EngineLoadPolicy"
    policy = serve_cfg.policy.get_policy()  # what Serve's controller unpickles and instantiates
    assert policy(**serve_cfg.policy.policy_kwargs).target_kv_cache_usage == 0.8


def test_vllm_stat_logger_keeps_the_last_steps_scheduler_load() -> None:
    from vllm.v1.metrics.stats import SchedulerStats

    load = SchedulerLoad()
    logger = load.stat_logger()(None, 0)
    logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.75), None)
    assert (load.waiting, load.kv_cache_usage) == (2, 0.75)
    logger.record(None, None)  # a step without scheduler stats changes nothing
    assert (load.waiting, load.kv_cache_usage) == (2, 0.75)


def test_a_replica_reports_its_fullest_cache() -> None:
    class Loaded(FakeEngine):
        def __init__(self, usage: float) -> None:
            super().__init__("m")
            self.usage = usage

        def stats(self) -> EngineStats:
            return EngineStats(running=1, kv_cache_usage=self.usage)

    assert autoscaling_stats([Loaded(0.2), Loaded(0.7)]) == {KV_CACHE_USAGE_STAT: 0.7}
    assert autoscaling_stats([]) == {KV_CACHE_USAGE_STAT: 0.0}
