"""What the gateway talks to: model ids (and aliases) mapped to live models and their engines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from models.registry import Registry
from serve.config import ServeConfig
from serve.engine import Engine, ModelCard
from serve.errors import ModelNotFound
from serve.factory import served_id
from serve.live import LiveModel


class ModelBackend:
    """Resolves a request's `model` to an engine: a served id, an alias, or a LoRA adapter."""

    def __init__(self, models: Mapping[str, Engine | LiveModel], aliases: Mapping[str, str] | None = None) -> None:
        self.models = {k: v if isinstance(v, LiveModel) else LiveModel.static(v) for k, v in models.items()}
        self.aliases = dict(aliases or {})
        for alias, target in self.aliases.items():
            if target not in self.models:
                raise ValueError(f"alias {alias!r} points at unknown model {target!r}")

    def resolve(self, model: str) -> Engine:
        live = self.models.get(model) or self.models.get(self.aliases.get(model, ""))
        if live is not None:
            return live.pick()
        for live in self.models.values():
            if live.adapters:
                engine = live.adapter_engine(model)
                if engine is not None:
                    return engine
        raise ModelNotFound(model)

    def grant_names(self, model: str) -> tuple[str, ...]:
        """The names a key's model list may grant `model` by: itself, the served id (an alias's target) and the
        registry reference it serves.

        An adapter is granted by its own name only: a key allowed a base model may not call every adapter on it.
        """
        live = self.models.get(model) or self.models.get(self.aliases.get(model, ""))
        if live is None:
            return (model,)
        card = live.card
        return tuple(dict.fromkeys(n for n in (model, card.id, card.root) if n))

    def running_engines(self) -> list[Engine]:
        """Every running engine of every model (two models may serve one version: each has its own)."""
        return [e for live in self.models.values() for e in live.all_engines()]

    def cards(self) -> list[ModelCard]:
        out = []
        for live in self.models.values():
            out.append(live.card)
            out += live.adapter_cards()
        return out

    async def start(self) -> None:
        """Start every model (one after another: engines load faster than they share a CPU)."""
        try:
            for live in self.models.values():
                await live.start()
        except BaseException:
            await self.shutdown()
            raise

    async def shutdown(self) -> None:
        for live in self.models.values():
            with contextlib.suppress(Exception):
                await live.shutdown()

    async def readiness(self, in_process_only: bool = False) -> dict[str, bool]:
        """Health of every model (or of those whose engines run in this process), checked concurrently."""
        models = {k: v for k, v in self.models.items() if v.in_process or not in_process_only}
        results = await asyncio.gather(*(live.readiness() for live in models.values()))
        return dict(zip(models, results))


def build_backend(cfg: ServeConfig, registry: Registry | None, handles: Mapping[str, Any] | None = None) -> ModelBackend:
    """The models of a Serve config (not started): served id -> live model.

    `handles`: the Serve handles of `placement: deployment` models, by served id.
    """
    models: dict[str, LiveModel] = {}
    for model_cfg in cfg.models:
        served = served_id(model_cfg)
        if served in models:
            raise ValueError(f"two deployments serve {served!r}: set served_name")
        if model_cfg.placement == "deployment":
            if not handles or served not in handles:
                raise ValueError(f"{served!r} has placement `deployment` but no deployment handle was given")
            from gateway.routing.affinity import conversation_key
            from serve.handle_engine import HandleModel

            route_key = conversation_key if model_cfg.routing == "conversation" else None
            models[served] = HandleModel(model_cfg, handles[served], route_key)
        else:
            models[served] = LiveModel(model_cfg, registry)
    return ModelBackend(models)
