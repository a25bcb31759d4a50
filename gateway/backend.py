"""What the gateway talks to: model ids (and aliases) mapped to engines."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from serve.engine import Engine, ModelCard
from serve.errors import EngineError, ModelNotFound


class ModelBackend:
    """Resolves a request's `model` to an engine; engines may be local or remote handles."""

    def __init__(self, engines: Mapping[str, Engine], aliases: Mapping[str, str] | None = None) -> None:
        self.engines = dict(engines)
        self.aliases = dict(aliases or {})
        for alias, target in self.aliases.items():
            if target not in self.engines:
                raise ValueError(f"alias {alias!r} points at unknown model {target!r}")

    def resolve(self, model: str) -> Engine:
        engine = self.engines.get(model) or self.engines.get(self.aliases.get(model, ""))
        if engine is None:
            raise ModelNotFound(model)
        return engine

    def cards(self) -> list[ModelCard]:
        return [e.card for e in self.engines.values()]

    async def readiness(self) -> dict[str, bool]:
        """Health of every engine, checked concurrently."""

        async def one(engine: Engine) -> bool:
            try:
                await engine.check_health()
                return True
            except EngineError:
                return False

        results = await asyncio.gather(*(one(e) for e in self.engines.values()))
        return dict(zip(self.engines, results))
