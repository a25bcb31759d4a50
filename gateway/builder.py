"""Builders: a config (YAML path, dict or object) -> a Ray Serve application.

Usable from a Serve config file: `import_path: gateway.builder:build_app` with
`args: {config: path/to/raygate.yaml}` or the config inline under `args`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from gateway.config import AppConfig
from gateway.deployment import GatewayIngress


def deployment_options(cfg: AppConfig) -> dict[str, Any]:
    """Serve options of the ingress, with the resources of the engines it hosts."""
    g = cfg.gateway
    num_cpus = g.num_cpus + sum(m.num_cpus for m in cfg.serve.models)
    num_gpus = sum(m.num_gpus for m in cfg.serve.models)
    opts: dict[str, Any] = {
        "name": g.name,
        "num_replicas": g.num_replicas,
        "max_ongoing_requests": g.max_ongoing_requests,
        "max_queued_requests": g.max_queued_requests,
        "health_check_period_s": g.health_check_period_s,
        "health_check_timeout_s": g.health_check_timeout_s,
        "graceful_shutdown_timeout_s": g.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
    }
    parallel = [m for m in cfg.serve.models if m.tensor_parallel_size * m.pipeline_parallel_size > 1]
    if parallel:
        # vLLM's Ray executor places its workers in the replica's placement group.
        workers = sum(m.tensor_parallel_size * m.pipeline_parallel_size for m in parallel)
        opts["ray_actor_options"] = {"num_cpus": num_cpus, "num_gpus": 0}
        opts["placement_group_bundles"] = [{"CPU": num_cpus}] + [{"GPU": 1}] * workers
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def build_app(args: dict[str, Any] | AppConfig | str | Path) -> Application:
    """Serve entry point: `serve run gateway.builder:build_app config=raygate.yaml`."""
    if isinstance(args, dict) and "config" in args and len(args) == 1:
        args = args["config"]
    cfg = AppConfig.load(args)
    return serve.deployment(GatewayIngress).options(**deployment_options(cfg)).bind(cfg.model_dump(mode="json"))
