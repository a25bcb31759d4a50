"""The model list a key sees: the models and routes it may call, as OpenAI's `/v1/models` shows them."""

from __future__ import annotations

from typing import Any

from gateway.backend import ModelBackend
from gateway.governance.records import KeyRecord
from gateway.settings import GatewaySettings
from serve.engine import ModelCard
from serve.errors import ModelNotFound


class ModelCatalog:
    """`/v1/models` and `/v1/models/{id}` for a caller."""

    def __init__(self, settings: GatewaySettings, backend: ModelBackend) -> None:
        self.settings = settings
        self.backend = backend

    def route_card(self, name: str) -> ModelCard:
        """A route as `/v1/models` shows it: its first target's card under the route's name."""
        return self.backend.resolve(self.settings.routes[name].targets[0].model).card.model_copy(update={"id": name})

    def list(self, caller: KeyRecord) -> dict[str, Any]:
        cards = [c for c in self.backend.cards() if caller.may_use(c.id, c.root or "")]
        cards += [self.route_card(name) for name in self.settings.routes if caller.may_use(name)]
        return {"object": "list", "data": [c.model_dump(exclude_none=True) for c in cards]}

    def get(self, caller: KeyRecord, model_id: str) -> dict[str, Any]:
        routes = self.settings.routes
        card = self.route_card(model_id) if model_id in routes else self.backend.resolve(model_id).card
        if not caller.may_use(model_id, card.id):
            raise ModelNotFound(model_id)  # as OpenAI answers for a model the key cannot access
        return card.model_dump(exclude_none=True)
