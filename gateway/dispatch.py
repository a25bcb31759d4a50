"""Running a request on its targets: the first that starts wins, a failure before any output falls back.

A full response also ends early when the client disconnects (the engine call is cancelled, which aborts
the request in the engine) or when it outlasts its timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from gateway.backend import ModelBackend
from gateway.errors import RequestTimeout
from serve.engine import Endpoint, Engine
from serve.errors import EngineFailure, EngineOverloaded, EngineUnavailable

logger = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# Worth trying the next target: the chosen one is saturated, down or broke before any output.
RETRYABLE = (EngineOverloaded, EngineUnavailable, EngineFailure)


class Started:
    """A stream whose first event has already arrived (so a failure before it could still fall back)."""

    __slots__ = ("head", "rest")

    def __init__(self, head: bytes, rest: AsyncIterator[bytes]) -> None:
        self.head = head
        self.rest = rest

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()


async def _first(engine: Engine, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> bytes | Started:
    """Start a request; for a stream, wait for its first event so a failure can still fall back."""
    result = await engine.generate(endpoint, body, request_id)
    if isinstance(result, bytes):
        return result
    started = Started(b"", result)
    try:
        started.head = await result.__anext__()
    except StopAsyncIteration:
        pass
    except BaseException:
        await started.aclose()
        raise
    return started


async def dispatch(
    backend: ModelBackend, first: Engine, targets: list[str], endpoint: Endpoint, body: dict[str, Any], request_id: str
) -> tuple[bytes | Started, Engine, int]:
    """Try `targets` in order until one starts (`first`: the engine already picked for `targets[0]`).

    Returns (result, engine, fallbacks taken). The first engine is the one admission was
    sized on: with a canary split, resolving again could pick another version.
    """
    last: Exception | None = None
    for attempt, target in enumerate(targets):
        engine = first if attempt == 0 else backend.resolve(target)
        try:
            return await _first(engine, endpoint, body, request_id), engine, attempt
        except RETRYABLE as exc:
            logger.info("request %s: %s failed before output (%s); %s", request_id, target, type(exc).__name__,
                        "trying the next target" if attempt + 1 < len(targets) else "no target left")
            last = exc
    assert last is not None
    raise last


async def generate(
    backend: ModelBackend,
    first: Engine,
    targets: list[str],
    endpoint: Endpoint,
    body: dict[str, Any],
    request_id: str,
    request: Request,
    timeout_s: float,
) -> tuple[bytes | Started, Engine, int]:
    """Dispatch; for a full response, abort it if the client disconnects or it times out."""
    if body.get("stream"):
        return await dispatch(backend, first, targets, endpoint, body, request_id)
    work = asyncio.ensure_future(dispatch(backend, first, targets, endpoint, body, request_id))
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()  # cancelling the engine call aborts the request in the engine
    await asyncio.wait({work})  # ... before the 499 or 504 goes out, so its slot is free when the client hears
    if watch in done:
        raise ClientDisconnected()
    raise RequestTimeout(f"The request did not finish within {timeout_s:g} s.")
