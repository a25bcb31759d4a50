"""The one engine interface every implementation (vLLM, fake, remote handle) follows.

An engine takes an OpenAI request body (already validated by the gateway) and returns
either the full JSON response as bytes or an async iterator of SSE events (bytes, each
``data: ...\n\n``, the last one ``data: [DONE]\n\n``). Errors are raised as
``serve.errors.EngineError`` subclasses; an iterator may raise one after it started.
Cancelling the awaiting task (or closing the iterator) aborts the request in the engine.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, Field

Endpoint = Literal["chat", "completion"]
EngineResult = bytes | AsyncIterator[bytes]


class ModelCard(BaseModel):
    """What `/v1/models` says about a served model."""

    id: str = Field(description="The model id clients send in `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the version was published.")
    owned_by: str = Field(default="raygate", description="Owner shown to clients.")
    root: str | None = Field(default=None, description="Registry reference `name@version` actually served.")
    max_model_len: int | None = Field(default=None, description="Context length in tokens.")
    engine: str | None = Field(default=None, description="Engine implementation (vllm, fake, remote).")


class EngineStats(BaseModel):
    """A point-in-time view of an engine's load."""

    running: int = Field(description="Requests admitted and not finished (waiting or generating).")
    healthy: bool = Field(default=True, description="Whether the last health check passed.")


class Engine(abc.ABC):
    """A text-generation engine behind the OpenAI API."""

    @property
    @abc.abstractmethod
    def card(self) -> ModelCard:
        """The model card of the served model (valid after `start`)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns when the engine accepts requests."""

    @abc.abstractmethod
    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        """Run one chat or completion request (see the module docstring)."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise EngineUnavailable if the engine cannot serve."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""
