"""The whole application's config: the gateway deployment plus the models it serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from serve.config import AutoscalingConfig, ServeConfig


class ConversationRoutingConfig(BaseModel):
    """Sticky routing of a conversation to the gateway replica whose engines cached its prefix. The load gap and
    stats period also apply to models in deployments of their own that route by conversation (their `routing`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Route by conversation (`prompt_cache_key`, the x-session-id header, or the messages up to the "
        "first user turn) instead of by load alone. With HAProxy, every POST first asks a small router deployment "
        "for its replica; worth it with several replicas and long shared prefixes.",
    )
    max_load_gap: int = Field(
        default=16, ge=0,
        description="A conversation's replica is passed over while it has this many more requests in flight than "
        "the least busy replica (gateway replicas, and the replicas of models routed by conversation). Lower it "
        "when a few long conversations should spread; raise it to keep more turns on their cached prefixes.",
    )
    max_kv_cache_usage: float | None = Field(
        default=0.9, gt=0, le=1,
        description="A conversation's replica is passed over while its engines' KV cache is this full or more (the "
        "blocks its running requests hold; a new request would wait there, or make vLLM preempt one, while another "
        "replica has room). Lower it when queueing behind a full cache costs more than a recomputed prefix; `null` "
        "routes on requests in flight alone.",
    )
    stats_period_s: float = Field(
        default=1.0, gt=0,
        description="How often each replica reports its in-flight requests and KV cache use to the routers.",
    )
    replica_header: bool = Field(
        default=False, description="Name the replica that answered in an `x-raygate-replica` response header."
    )


class GatewayDeploymentConfig(BaseModel):
    """Ray Serve options of the gateway (ingress) deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="gateway", description="Serve deployment name of the ingress.")
    num_replicas: int = Field(default=1, ge=1, description="Gateway replicas, each hosting the co-located engines; raise it to serve more load across nodes "
        "(more than one needs redis_url).")
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Scale replicas with load instead of a fixed num_replicas."
    )
    metrics_dir: str | None = Field(
        default=None,
        description="Directory where a node's gateway replicas pool their Prometheus samples (PROMETHEUS_MULTIPROC_DIR), "
        "so /metrics of any replica counts them all. Default: <tmp>/raygate-metrics/<cluster>/<app_name>, <cluster> "
        "the id of the Ray node that built the application, new at every cluster start, so two stacks on one host "
        "never count or wipe each other's samples. Set it only to read the samples from outside (`raygate up` empties it "
        "at each start).",
    )
    num_cpus: float = Field(default=0.5, ge=0, description="CPUs Ray reserves per gateway replica.")
    max_ongoing_requests: int = Field(
        default=1024, ge=1, description="Requests in flight per replica before Serve queues more (a replica that listens "
        "itself, on one node, answers 503 past this plus max_queued_requests); keep it well above the client "
        "concurrency one replica should carry."
    )
    max_queued_requests: int = Field(default=2048, ge=-1, description="Requests Serve queues per replica before it refuses (-1: no limit); lower it to shed load sooner.")
    health_check_period_s: float = Field(default=10.0, gt=0, description="How often Serve checks replica health.")
    health_check_timeout_s: float = Field(default=30.0, gt=0, description="A health check slower than this fails.")
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0, description="Time a stopping replica drains its requests; raise it above your longest generation.")
    log_encoding: Literal["JSON", "TEXT"] = Field(
        default="JSON", description="Replica log lines as JSON (with request ids) or Serve's text format."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the gateway replicas, for example OTEL_TRACES_EXPORTER=otlp and "
        "OTEL_EXPORTER_OTLP_ENDPOINT to export traces.",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="GatewaySettings fields (no secrets here: use api_keys_file)."
    )
    conversation_routing: ConversationRoutingConfig = Field(
        default_factory=ConversationRoutingConfig, description="Sticky routing of conversations across replicas."
    )

    def serve_logging(self) -> dict[str, Any]:
        """Serve's logging config for the replicas (and `raygate up`'s controller and proxy).

        Serve's per-request access log stays off: the gateway writes its own off the hot path (`access_log`).
        """
        return {"encoding": self.log_encoding, "log_level": "INFO", "enable_access_log": False}

    def needs_serve_ingress(self) -> str | None:
        """Why the replicas cannot take client connections themselves on one node (None: they can).

        Conversation routing is HAProxy asking a router for each request's replica; gateway autoscaling
        scales on the requests Serve's ingress hands the replicas. Both need Serve's ingress in front.
        """
        if self.conversation_routing.enabled:
            return "conversation routing"
        if self.autoscaling is not None:
            return "gateway autoscaling"
        return None


class AppConfig(BaseModel):
    """`deploy/serve_config.yaml`'s `args.config`, or a file of this shape."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field(default="raygate", description="Serve application name.")
    route_prefix: str = Field(default="/", description="HTTP prefix of the application.")
    gateway: GatewayDeploymentConfig = Field(default_factory=GatewayDeploymentConfig, description="Ingress options.")
    serve: ServeConfig = Field(description="Models and registry.")

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | AppConfig) -> AppConfig:
        if isinstance(source, AppConfig):
            return source
        if isinstance(source, dict):
            return cls.model_validate(source)
        return cls.model_validate(yaml.safe_load(Path(source).read_text()))
