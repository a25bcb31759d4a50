"""The fake engine on its own, as a bare OpenAI-compatible HTTP server (no gateway).

The baseline of the gateway-overhead benchmark (`benchmarks/scenarios/overhead.yaml`) and
an upstream for proxy comparisons: the same `FakeEngine` the gateway hosts, behind the
thinnest ASGI app that speaks the API (no auth, no validation beyond the engine's own),
on the same server stack as the gateway (uvicorn, uvloop, httptools). Loopback only.

    python -m serve.fake_server --port 8001 --model fake --ttft-ms 0 --itl-ms 0
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from serve.config import FakeEngineConfig
from serve.errors import EngineError, EngineFailure, EngineOverloaded, EngineUnavailable, ModelNotFound
from serve.fake_engine import FakeEngine

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/messages": "messages",
          "/v1/responses": "responses", "/v1/embeddings": "embeddings", "/tokenize": "tokenize",
          "/detokenize": "detokenize"}


def _status(exc: EngineError) -> int:
    if isinstance(exc, ModelNotFound):
        return 404
    if isinstance(exc, EngineOverloaded | EngineUnavailable):
        return 503
    if isinstance(exc, EngineFailure):
        return 500
    return 400


def _envelope(message: str, etype: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": etype, "param": param, "code": code}})


class FakeServer:
    """ASGI app: `/v1/chat/completions`, `/v1/completions`, `/v1/messages`, `/v1/responses`, `/v1/embeddings`,
    `/tokenize`, `/detokenize`, `/v1/models`, `/health`."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self._models = orjson.dumps({"object": "list", "data": [engine.card.model_dump(exclude_none=True)]})

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            return await self._reply(send, 200, b'{"status":"ok"}')
        if method == "GET" and path == "/v1/models":
            return await self._reply(send, 200, self._models)
        endpoint = _PATHS.get(path)
        if endpoint is None or method != "POST":
            return await self._reply(send, 404, _envelope(f"Unknown path {path}.", "invalid_request_error"))
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return await self._reply(send, 400, _envelope("Invalid JSON body.", "invalid_request_error"))
        if not isinstance(body, dict):
            return await self._reply(send, 400, _envelope("The body must be a JSON object.", "invalid_request_error"))
        if body.get("model") != self.engine.card.id:
            exc = ModelNotFound(str(body.get("model")))
            return await self._reply(send, 404, _envelope(exc.message, "invalid_request_error", exc.code, "model"))
        try:
            result = await self.engine.generate(endpoint, body, uuid.uuid4().hex)  # type: ignore[arg-type]
        except EngineError as exc:
            return await self._reply(send, _status(exc), _envelope(exc.message, "invalid_request_error", exc.code, exc.param))
        if isinstance(result, bytes):
            return await self._reply(send, 200, result)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        try:
            async for chunk in result:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except EngineError as exc:
            event = b"data: " + _envelope(exc.message, "server_error", exc.code) + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _reply(send: Send, status: int, payload: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": _JSON})
        await send({"type": "http.response.body", "body": payload})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="Loopback address to bind.")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default="fake", help="Model id it answers to.")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("fake_server binds loopback addresses only")
    import uvicorn

    engine = FakeEngine(a.model, FakeEngineConfig(ttft_ms=a.ttft_ms, itl_ms=a.itl_ms))
    uvicorn.run(FakeServer(engine), host=a.host, port=a.port, log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
