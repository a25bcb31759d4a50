"""Autoscaling on what the engines report: requests in flight, and the KV cache they hold.

Serve's own policy scales on requests in flight per replica (`target_ongoing_requests`). An LLM replica
runs out of KV cache before it runs out of request slots when prompts or outputs are long: requests then
wait in the engine's scheduler, or are preempted and recomputed, while the request count still looks
low. Each replica hosting engines reports its fullest KV cache (`serve.engine.autoscaling_stats`,
Serve's `record_autoscaling_stats`); this policy asks for as many replicas as either signal needs:

    replicas = max(requests in flight / target_ongoing_requests,  sum of KV cache use / target_kv_cache_usage)

Serve applies the bounds, the scaling factors and the upscale and downscale delays, as for its own policy.
The decision (`replicas_for_load`) is a pure function; `EngineLoadPolicy` adapts it to Serve's
AutoscalingContext. This module is pickled by value into Serve's controller: it imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KV_CACHE_USAGE_STAT = "kv_cache_usage"  # the stat's name, as serve.engine.autoscaling_stats reports it


def replicas_for_load(in_flight: float, target_in_flight: float, kv_cache_usage: Mapping[Any, float],
                      target_kv_cache_usage: float | None) -> float:
    """Replicas the load asks for (fractional: Serve rounds up): by requests in flight, or by KV cache in use
    summed over the replicas reporting it, whichever asks for more. No KV target, or no report: requests only."""
    by_requests = in_flight / target_in_flight
    if not target_kv_cache_usage or not kv_cache_usage:
        return by_requests
    return max(by_requests, sum(kv_cache_usage.values()) / target_kv_cache_usage)


class EngineLoadPolicy:
    """Serve's autoscaling policy for replicas that host engines (`policy_kwargs`: target_kv_cache_usage)."""

    def __init__(self, target_kv_cache_usage: float | None = None) -> None:
        self.target_kv_cache_usage = target_kv_cache_usage

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        kv = (ctx.aggregated_metrics or {}).get(KV_CACHE_USAGE_STAT) or {}
        running = set(ctx.running_replicas)
        kv = {replica: usage for replica, usage in kv.items() if replica in running}
        desired = replicas_for_load(ctx.total_num_requests, ctx.config.get_target_ongoing_requests(), kv,
                                    self.target_kv_cache_usage)
        return desired, {}
