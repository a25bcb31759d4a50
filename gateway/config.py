"""The whole application's config: the gateway deployment plus the models it serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from serve.config import ServeConfig


class GatewayDeploymentConfig(BaseModel):
    """Ray Serve options of the gateway (ingress) deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="gateway", description="Serve deployment name of the ingress.")
    num_replicas: int = Field(default=1, ge=1, description="Gateway replicas (each hosts the co-located engines).")
    num_cpus: float = Field(default=0.5, ge=0, description="CPUs Ray reserves per gateway replica.")
    max_ongoing_requests: int = Field(
        default=1024, ge=1, description="Requests in flight per replica; keep well above client concurrency."
    )
    max_queued_requests: int = Field(default=2048, ge=-1, description="Requests Serve queues before refusing.")
    health_check_period_s: float = Field(default=10.0, gt=0, description="How often Serve checks replica health.")
    health_check_timeout_s: float = Field(default=30.0, gt=0, description="A health check slower than this fails.")
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0, description="Time to drain requests on stop.")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="GatewaySettings fields (no secrets here: use api_keys_file)."
    )


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
