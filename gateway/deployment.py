"""The gateway as a Ray Serve ingress deployment, with its engines co-located in-process.

Co-locating the engine with the HTTP app removes the per-token Ray message between an
ingress and an engine deployment (see ARCHITECTURE.md, "A throwaway prototype").
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve

from gateway.app import create_app
from gateway.backend import build_backend
from gateway.config import AppConfig
from gateway.governance.gate import Governance
from gateway.listener import Listener, reuse_port_socket, with_response_header
from gateway.logs import OWN_LOGGERS
from gateway.metrics import multiprocess_dir
from gateway.settings import GatewaySettings
from models.registry import Registry
from serve.engine import autoscaling_stats, routing_stats, stats_by_version
from serve.errors import EngineUnavailable
from serve.replica_logs import route_logs_to_serve

logger = logging.getLogger(__name__)

# Of a stopping replica's `graceful_shutdown_timeout_s`, what its engines keep to shut down after the drain.
ENGINE_STOP_S = 5.0


def registry_location(cfg: AppConfig, settings: GatewaySettings) -> tuple[str, str]:
    """The registry's root (directory or fsspec URL) and the local cache of a remote one."""
    root = cfg.serve.registry or str(settings.home / "registry")
    if "://" not in root:
        root = os.path.expanduser(root)
    return root, str(settings.home / "cache")


def registry_for(cfg: AppConfig, settings: GatewaySettings) -> Registry:
    root, cache = registry_location(cfg, settings)
    return Registry(root, cache_dir=cache)


def with_header(app: Any, name: bytes, value: bytes) -> Any:
    """`app` with one more header on every HTTP response."""
    return with_response_header(app, name, lambda _scope: value)


@serve.ingress()
class GatewayIngress:
    """One replica: the FastAPI gateway plus the engines of its co-located models."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, config: dict[str, Any], models: dict[str, Any] | None = None, listen: dict[str, Any] | None = None
    ) -> None:
        """`models`: handles of the models in deployments of their own, by the id clients send.
        `listen` (`{"host", "port"}`): take client connections there (SO_REUSEPORT, gateway/listener.py)
        instead of through Serve's ingress; the app starts listening once its engines are ready."""
        shared = multiprocess_dir()
        if shared is not None:
            shared.mkdir(parents=True, exist_ok=True)  # the builder set it; `serve deploy` has no Stack to make it
        route_logs_to_serve(OWN_LOGGERS)
        cfg = AppConfig.load(config)
        self.settings = GatewaySettings(**cfg.gateway.settings)
        # Governance first: a configuration error (keys, store) fails in a second, not after an engine's load.
        self.governance = Governance.build(self.settings)
        # A taken port fails here, in a second, not after the engines load.
        sock = reuse_port_socket(listen["host"], int(listen["port"])) if listen is not None else None
        self.registry = registry_for(cfg, self.settings)
        self.backend = build_backend(cfg.serve, self.registry, models)
        await self.backend.start()
        self.replica_header = cfg.gateway.conversation_routing.replica_header
        self.asgi_app = self._build_app()
        self.drain_s = max(0.0, cfg.gateway.graceful_shutdown_timeout_s - ENGINE_STOP_S)
        self.listener: Listener | None = None
        if sock is not None:
            g = cfg.gateway
            most = g.max_ongoing_requests + g.max_queued_requests if g.max_queued_requests >= 0 else 2**31
            self.listener = Listener(self.asgi_app, sock, most)
            await self.listener.start()

    def _build_app(self) -> Any:
        app = create_app(self.settings, self.backend, self.governance, registry=self.registry)
        if self.replica_header:
            return with_header(app, b"x-raygate-replica", serve.get_replica_context().replica_id.unique_id.encode())
        return app

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi_app

    async def record_routing_stats(self) -> dict[str, Any]:
        """What this replica tells Serve's request routers (conversation routing passes over busy or KV-full replicas)."""
        return routing_stats(self.backend.running_engines())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What the co-located engines tell Serve's autoscaler (serve/autoscaling_policy.py)."""
        return autoscaling_stats(self.backend.running_engines())

    async def check_health(self) -> None:
        # Only co-located engines: restarting this replica cannot mend a model's own deployment (Serve checks it).
        states = await self.backend.readiness(in_process_only=True)
        bad = [m for m, ok in states.items() if not ok]
        if bad:
            raise EngineUnavailable(f"unhealthy engines: {', '.join(bad)}")

    async def engine_stats(self) -> dict[str, dict[str, Any]]:
        """Load of each engine by the version it serves (used by `raygate status` and tests)."""
        return stats_by_version(self.backend.running_engines())

    async def __del__(self) -> None:
        listener = getattr(self, "listener", None)
        if listener is not None:
            await listener.close(self.drain_s)  # new connections go to other replicas; requests held finish
        governance = getattr(self, "governance", None)  # absent when __init__ failed before it
        if governance is not None:
            try:
                await governance.close()  # writes the pending usage rows
            except Exception:  # pragma: no cover - best effort at teardown
                logger.exception("governance shutdown failed")
        backend = getattr(self, "backend", None)
        if backend is not None:
            await backend.shutdown()
