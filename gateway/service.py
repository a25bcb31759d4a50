"""Request logic between the HTTP routes and the engines: validate, dispatch, stream, abort."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.backend import ModelBackend
from gateway.errors import PayloadTooLarge, RequestTimeout, spec_for, sse_error_event
from gateway.governance.gate import Outcome
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from serve.engine import Endpoint, Engine
from serve.errors import EngineFailure, EngineOverloaded, EngineUnavailable, InvalidRequest, param_from_validation_error

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
SCHEMAS: dict[Endpoint, type[BaseModel]] = {"chat": ChatCompletionRequest, "completion": CompletionRequest}


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest / PayloadTooLarge."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def validate(endpoint: Endpoint, body: dict[str, Any]) -> BaseModel:
    try:
        return SCHEMAS[endpoint].model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = param_from_validation_error(exc)
        msg = err.get("msg", "invalid value")
        raise InvalidRequest(f"Invalid value for '{param}': {msg}" if param else msg, param=param) from None


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


def read_usage(payload: bytes, outcome: Outcome) -> None:
    """Fill `outcome` from a full response body (usage and the first choice's finish reason)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    usage = doc.get("usage") or {}
    outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
    choices = doc.get("choices") or []
    if choices:
        outcome.finish_reason = choices[0].get("finish_reason")


def want_usage(body: dict[str, Any]) -> bool:
    """Ask a stream for its usage chunk (to settle quotas); True if the client asked for it itself."""
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        return True
    body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return False


def observe(chunk: bytes, outcome: Outcome, client_wants_usage: bool) -> bytes:
    """Note usage, finish reasons and events passing by; drop the usage event the client did not ask for."""
    outcome.events += chunk.count(b'"choices":[{')
    if b'"finish_reason":"' in chunk and outcome.finish_reason is None:
        for event in chunk.split(b"\n\n"):
            if b'"finish_reason":"' in event and event.startswith(b"data: {"):
                try:
                    choices = orjson.loads(event[6:]).get("choices") or []
                except orjson.JSONDecodeError:
                    continue
                outcome.finish_reason = next((c.get("finish_reason") for c in choices if c.get("finish_reason")), None)
                break
    if b'"usage":{' not in chunk:
        return chunk
    kept = []
    for event in chunk.split(b"\n\n"):
        if b'"usage":{' in event and event.startswith(b"data: {"):
            try:
                doc = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                doc = {}
            usage = doc.get("usage") or {}
            outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
            outcome.usage_seen = True
            if not client_wants_usage and not doc.get("choices"):
                continue
        if event:
            kept.append(event)
    return b"\n\n".join(kept) + b"\n\n" if kept else b""


async def relay(
    stream: Started, outcome: Outcome, client_wants_usage: bool, request_id: str,
    finish: Callable[[bool], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """The client's SSE body: one generator per stream, however many events.

    Events pass through `observe`; an error after the start becomes one error event and
    [DONE]; `finish(client_left)` runs once at the end, however the stream ended.
    """
    client_left = False
    try:
        chunk = observe(stream.head, outcome, client_wants_usage) if stream.head else b""
        if chunk:
            yield chunk
        async for chunk in stream.rest:
            chunk = observe(chunk, outcome, client_wants_usage)
            if chunk:
                yield chunk
    except Exception as exc:  # noqa: BLE001 - every failure must reach the client as an event
        logger.warning("stream %s failed after start: %s", request_id, exc)
        outcome.status = spec_for(exc).status  # the ledger and metrics see the failure the client was sent
        yield sse_error_event(exc)
        yield DONE
    except BaseException:  # cancelled or closed: the client went away mid-stream
        client_left = True
        raise
    finally:
        # Shielded: when the client leaves, Starlette cancels the response's task group, and anyio's
        # cancellation hits every await after it. Unshielded, the engine's abort, the quota settlement
        # and the ledger row never ran for a stream the client dropped (Serve replicas).
        with anyio.CancelScope(shield=True):
            try:
                await stream.aclose()
            finally:
                await finish(client_left)
