"""Builders: a config (YAML path, dict or object) -> a Ray Serve application.

Usable from a Serve config file: `import_path: gateway.builder:build_app` with
`args: {config: path/to/raygate.yaml}` or the config inline under `args`.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve import Application, Deployment

from gateway.config import AppConfig
from gateway.deployment import GatewayIngress, registry_location
from gateway.metrics import MULTIPROC_ENV
from gateway.settings import GatewaySettings
from models.refs import ModelRef
from serve.config import AutoscalingConfig, ModelDeploymentConfig
from serve.factory import checkpoint_dir, served_id
from serve.vllm_args import check_engine_args


def as_deployment(cls: type) -> Deployment:
    """`serve.deployment(cls)`, typed as what it returns for a class (Serve declares the decorator-factory form)."""
    return cast(Deployment, serve.deployment(cls))


def deployment_options(cfg: AppConfig) -> dict[str, Any]:
    """Serve options of the ingress, with the resources of the engines it hosts."""
    g = cfg.gateway
    colocated = [m for m in cfg.serve.models if m.placement == "gateway"]
    opts = {
        "name": g.name,
        "max_ongoing_requests": g.max_ongoing_requests,
        "max_queued_requests": g.max_queued_requests,
        **_common_options(cfg),
        **_resources(g.num_cpus + sum(m.num_cpus for m in colocated), colocated, runtime_env(cfg)),
        **_scaling(g.autoscaling, g.num_replicas),
    }
    if g.conversation_routing.enabled:
        opts["request_router_config"] = conversation_router_config(cfg)
    return opts


def conversation_router_config(cfg: AppConfig) -> Any:
    """Serve's request-router config that routes a deployment's requests by conversation (see
    `gateway.routing.replica_router`), with the gateway's load gap and stats period."""
    from ray.serve.config import RequestRouterConfig

    routing = cfg.gateway.conversation_routing
    router: dict[str, Any] = {  # Serve's pydantic model, untyped for mypy: fields by name
        "request_router_class": "gateway.routing.replica_router:ConversationRequestRouter",
        "request_router_kwargs": {"max_load_gap": routing.max_load_gap,
                                  "max_kv_cache_usage": routing.max_kv_cache_usage},
        "request_routing_stats_period_s": routing.stats_period_s,
        "request_routing_stats_timeout_s": max(routing.stats_period_s, 5.0),
    }
    return RequestRouterConfig(**router)


def model_deployment_name(model: ModelDeploymentConfig) -> str:
    """`<model>@<version>` (or `@<alias>` it follows), the name a `placement: deployment` model has in Serve."""
    if model.engine != "openai" and checkpoint_dir(model) is None:
        with contextlib.suppress(ValueError):
            ref = ModelRef.parse(model.model)
            return f"{served_id(model)}@{ref.version if ref.version is not None else ref.alias}"
    return served_id(model)


def model_options(cfg: AppConfig, model: ModelDeploymentConfig) -> dict[str, Any]:
    """Serve options of a model's own deployment (`placement: deployment`)."""
    opts = {
        "name": model_deployment_name(model),
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        **_common_options(cfg),
        **_resources(model.num_cpus, [model], {"env_vars": engine_env(cfg)}),
        **_scaling(model.autoscaling, model.num_replicas),
    }
    if model.routing == "conversation":
        opts["request_router_config"] = conversation_router_config(cfg)
    elif model.routing == "prefix_tree":
        opts["request_router_config"] = prefix_tree_router_config(cfg)
    return opts


# The prompt text Ray's prefix tree keeps (all replicas of a deployment together) before it evicts the least
# recently used, and what it keeps after: a few times what the engines' caches hold on a small deployment.
PREFIX_TREE_MAX_CHARS = 4_000_000
PREFIX_TREE_KEEP_CHARS = 3_600_000


def prefix_tree_router_config(cfg: AppConfig) -> Any:
    """Serve's request-router config for Ray Serve LLM's prefix-aware router (`routing: prefix_tree`): the gateway's
    load gap as its imbalance threshold, the tree's oldest prompts evicted past PREFIX_TREE_MAX_CHARS. It reads
    each call's `serve.handle_engine.PromptBody`."""
    from ray.serve.config import RequestRouterConfig

    routing = cfg.gateway.conversation_routing
    router: dict[str, Any] = {
        "request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter",
        "request_router_kwargs": {"imbalanced_threshold": routing.max_load_gap, "do_eviction": True,
                                  "eviction_threshold_chars": PREFIX_TREE_MAX_CHARS,
                                  "eviction_target_chars": PREFIX_TREE_KEEP_CHARS},
    }
    return RequestRouterConfig(**router)


def _common_options(cfg: AppConfig) -> dict[str, Any]:
    g = cfg.gateway
    return {
        "health_check_period_s": g.health_check_period_s,
        "health_check_timeout_s": g.health_check_timeout_s,
        "graceful_shutdown_timeout_s": g.graceful_shutdown_timeout_s,
        "logging_config": g.serve_logging(),
    }


def _scaling(autoscaling: AutoscalingConfig | None, num_replicas: int) -> dict[str, Any]:
    return {"autoscaling_config": autoscaling.serve_options()} if autoscaling else {"num_replicas": num_replicas}


def _resources(num_cpus: float, models: list[ModelDeploymentConfig], env: dict[str, Any]) -> dict[str, Any]:
    """Actor resources of a replica hosting `models`' engines; GPU workers of parallel ones in its placement group."""
    actor: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": sum(m.num_gpus for m in models), "runtime_env": env}
    custom: Counter[str] = Counter()
    for m in models:
        custom.update(m.resources)
    if custom:
        actor["resources"] = dict(custom)
    workers = sum(m.gpus_per_engine for m in models if m.gpus_per_engine > 1)
    if not workers:
        return {"ray_actor_options": actor}
    # vLLM's Ray executor places its workers in the replica's placement group.
    return {"ray_actor_options": {**actor, "num_gpus": 0},
            "placement_group_bundles": [{"CPU": num_cpus, **custom}] + [{"GPU": 1}] * workers,
            "placement_group_strategy": "STRICT_PACK"}


def metrics_dir(cfg: AppConfig, cluster: str | None = None) -> str:
    """Where the application's gateway replicas on a node pool their Prometheus samples: `gateway.metrics_dir`,
    else a directory of the Ray cluster's own (`cluster`, default `ray_cluster_tag()`: a cluster started again
    gets a new one), so that a second stack on the host neither counts these samples nor wipes them."""
    if cfg.gateway.metrics_dir:
        return cfg.gateway.metrics_dir
    import tempfile

    return os.path.join(tempfile.gettempdir(), "raygate-metrics", cluster or ray_cluster_tag(), cfg.app_name)


def ray_cluster_tag() -> str:
    """The id of the Ray node this process runs on (the one building the application), `local` outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def runtime_env(cfg: AppConfig) -> dict[str, Any]:
    """Environment of every gateway replica, set before it imports anything."""
    return {"env_vars": {**engine_env(cfg), MULTIPROC_ENV: metrics_dir(cfg)}}


def engine_env(cfg: AppConfig) -> dict[str, str]:
    """Environment of every replica that runs engines."""
    # vLLM's logging setup runs logging.config.dictConfig, which closes every handler in the
    # process, Serve's replica log among them: nothing after the engine's import reached the log.
    return {"VLLM_CONFIGURE_LOGGING": "0", **cfg.gateway.env_vars}


def check_shared_state(cfg: AppConfig) -> None:
    """Refuse several gateway replicas whose quotas could not be shared (no Redis)."""
    settings = GatewaySettings(**cfg.gateway.settings)
    most = cfg.gateway.autoscaling.max_replicas if cfg.gateway.autoscaling else cfg.gateway.num_replicas
    if most > 1 and not settings.redis_url:
        raise ValueError(
            f"{most} gateway replicas need a shared quota store: set redis_url "
            "(RAYGATE_REDIS_URL); in-process quotas are exact for one replica only"
        )


def build_app(args: dict[str, Any] | AppConfig | str | Path) -> Application:
    """Serve entry point: `serve run gateway.builder:build_app config=raygate.yaml`, or a Serve config's
    `import_path` (`serve deploy`), whose `args` are the config inline or `{config: path}`. Serve calls an
    application builder with exactly one argument."""
    return build_application(args)


def build_application(args: dict[str, Any] | AppConfig | str | Path,
                      listen: tuple[str, int] | None = None) -> Application:
    """The Serve application of a config. `listen` (host, port): every gateway replica takes client connections
    there itself, with no Serve ingress in front (`raygate up` on one node; see gateway/listener.py)."""
    if isinstance(args, dict) and "config" in args and len(args) == 1:
        args = args["config"]
    cfg = AppConfig.load(args)
    check_shared_state(cfg)
    for model in cfg.serve.models:
        check_engine_args(model)  # a misspelt vLLM argument fails here, naming it, not in a replica
    if listen is not None and (reason := cfg.gateway.needs_serve_ingress()):
        raise ValueError(f"{reason} needs Serve's ingress in front of the gateway replicas")
    app = as_deployment(GatewayIngress).options(**deployment_options(cfg)).bind(
        cfg.model_dump(mode="json"), model_apps(cfg), {"host": listen[0], "port": listen[1]} if listen else None)
    return with_conversation_router(app, cfg)


def model_apps(cfg: AppConfig) -> dict[str, Application]:
    """The own deployment of every `placement: deployment` model, by the id clients send (the ingress gets handles)."""
    from serve.model_deployment import ModelServer

    root, cache = registry_location(cfg, GatewaySettings(**cfg.gateway.settings))
    return {
        served_id(m): as_deployment(ModelServer).options(**model_options(cfg, m)).bind(
            m.model_dump(mode="json"), root, cache)
        for m in cfg.serve.models if m.placement == "deployment"
    }


def with_conversation_router(app: Application, cfg: AppConfig) -> Application:
    """Behind HAProxy, attach the router deployment it asks for each POST's replica (conversation routing)."""
    routing = cfg.gateway.conversation_routing
    # The environment now, not Serve's import-time constant: this process may have imported Serve before
    # `raygate up` set the variable for the cluster it starts.
    if not routing.enabled or os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return app  # Serve's own proxy and handles use the request router directly
    from gateway.routing.replica_router import ConversationRouter

    router = as_deployment(ConversationRouter).options(
        # Serve places RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE replicas of it beside each proxy (num_replicas
        # does not apply); HAProxy tries the next one when a router cannot be reached.
        name=f"{cfg.gateway.name}-router", max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0}, logging_config=cfg.gateway.serve_logging(),
    ).bind(app)
    # Ray's hook for an ingress request router (the one Ray Serve LLM's direct streaming uses).
    return app._with_ingress_request_router(router)
