"""Request logic between the HTTP routes and the engines: validate, dispatch, stream, abort."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.backend import ModelBackend
from gateway.errors import PayloadTooLarge, RequestTimeout, sse_error_event
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from serve.engine import Endpoint, EngineResult
from serve.errors import InvalidRequest, param_from_validation_error

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


async def generate(
    backend: ModelBackend, endpoint: Endpoint, body: dict[str, Any], request_id: str, request: Request, timeout_s: float
) -> EngineResult:
    """Dispatch to the engine; for a full response, abort it if the client disconnects."""
    engine = backend.resolve(body["model"])
    if body.get("stream"):
        return await engine.generate(endpoint, body, request_id)
    work = asyncio.ensure_future(engine.generate(endpoint, body, request_id))
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
    if watch in done:
        raise ClientDisconnected()
    raise RequestTimeout(f"The request did not finish within {timeout_s:g} s.")


async def sse(stream: AsyncIterator[bytes], request_id: str) -> AsyncIterator[bytes]:
    """Pass events through; an error after the start becomes one error event and [DONE]."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - every failure must reach the client as an event
        logger.warning("stream %s failed after start: %s", request_id, exc)
        yield sse_error_event(exc)
        yield DONE
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
