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
from gateway.backend import ModelBackend
from gateway.config import AppConfig
from gateway.governance.gate import Governance
from gateway.settings import GatewaySettings
from models.registry import Registry
from serve.errors import EngineUnavailable
from serve.factory import create_engine

logger = logging.getLogger(__name__)


def registry_for(cfg: AppConfig, settings: GatewaySettings) -> Registry:
    root = cfg.serve.registry or str(settings.home / "registry")
    if "://" not in root:
        root = os.path.expanduser(root)
    return Registry(root, cache_dir=settings.home / "cache")


@serve.ingress()
class GatewayIngress:
    """One replica: the FastAPI gateway plus the engines of its co-located models."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.load(config)
        self.settings = GatewaySettings(**cfg.gateway.settings)
        registry = registry_for(cfg, self.settings)
        engines = {}
        for model_cfg in cfg.serve.models:
            engine = create_engine(model_cfg, registry)
            await engine.start()
            engines[engine.card.id] = engine
        self.backend = ModelBackend(engines)
        self.governance = Governance.build(self.settings)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, self.backend, self.governance)

    async def check_health(self) -> None:
        states = await self.backend.readiness()
        bad = [m for m, ok in states.items() if not ok]
        if bad:
            raise EngineUnavailable(f"unhealthy engines: {', '.join(bad)}")

    async def engine_stats(self) -> dict[str, dict[str, Any]]:
        """Load of each engine (used by `raygate status` and tests)."""
        return {name: e.stats().model_dump() for name, e in self.backend.engines.items()}

    async def __del__(self) -> None:
        try:
            await self.governance.close()  # writes the pending usage rows
        except Exception:  # pragma: no cover - best effort at teardown
            logger.exception("governance shutdown failed")
        for engine in self.backend.engines.values():
            try:
                await engine.shutdown()
            except Exception:  # pragma: no cover - best effort at teardown
                logger.exception("engine shutdown failed")
