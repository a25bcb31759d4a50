"""An OpenAI-compatible HTTP server as an engine: raygate in front of an upstream it does not run.

Keys, quotas, routing and the usage ledger of the gateway apply to it like to a local
engine; fallback can move a request from a local model to an upstream and back. Bodies
pass through as bytes (the gateway already validated them); SSE is re-framed on event
boundaries so the gateway sees whole events. Upstream errors keep their status class:
4xx become the client's error, 429/5xx and connection failures are retryable.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from opentelemetry.propagate import inject

from serve.config import UpstreamConfig
from serve.engine import Endpoint, Engine, EngineResult, EngineStats, InflightLimiter, ModelCard
from serve.errors import EngineError, EngineFailure, EngineUnavailable, InvalidRequest, error_for_status

logger = logging.getLogger(__name__)

# Under the upstream's base URL (`.../v1`); vLLM serves tokenize and detokenize beside `/v1`, not under it.
_PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "completion": "/completions", "messages": "/messages",
                               "responses": "/responses", "embeddings": "/embeddings", "tokenize": "/../tokenize",
                               "detokenize": "/../detokenize"}


def upstream_error(status: int, payload: bytes, retry_after: str | None = None) -> EngineError:
    """The engine error for an upstream's non-2xx answer, keeping its message, param and code."""
    try:
        err = orjson.loads(payload).get("error") or {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
    except (orjson.JSONDecodeError, AttributeError):
        err = {}
    message = str(err.get("message") or f"upstream answered {status}")
    code = err.get("code")
    code = str(code) if code is not None else None
    wait = int(retry_after) if retry_after and retry_after.isdigit() else None
    exc = error_for_status(status, message, param=err.get("param"), code=code, retry_after_s=wait)
    if not isinstance(exc, InvalidRequest):
        # Not the client's mistake (raygate's credentials, the upstream's load or failure): the client learns
        # that, and nothing of the upstream (its address, its internals); the operator's log has the message.
        logger.warning("upstream answered %s: %s", status, message[:500])
        exc.message = f"The upstream model answered {status}; retry later."
        exc.args = (exc.message,)
    return exc


async def reframe(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Upstream SSE bytes as chunks that each end on an event boundary (`\\n\\n`)."""
    buf = b""
    async for data in content.iter_any():
        buf += data
        cut = buf.rfind(b"\n\n")
        if cut >= 0:
            yield buf[: cut + 2]
            buf = buf[cut + 2 :]
    if buf.strip():
        yield buf if buf.endswith(b"\n\n") else buf + b"\n\n"


def _join(base_url: str, path: str) -> str:
    """`path` under `base_url`, a leading `/..` taking the base's last segment off (`/v1` + `/../tokenize`)."""
    base = base_url.rstrip("/")
    while path.startswith("/.."):
        base, path = base.rsplit("/", 1)[0], path[3:]
    return base + path


class RemoteEngine(Engine):
    """Forwards requests to `cfg.base_url` with one pooled aiohttp session."""

    forwards_trace_context = True

    def __init__(self, served_name: str, upstream_model: str, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.upstream_model = upstream_model
        self._card = ModelCard(
            id=served_name, created=int(time.time()), root=upstream_model,  # never the address: clients see it
            max_model_len=cfg.max_model_len, engine="remote",
        )
        self._session: aiohttp.ClientSession | None = None
        self._admission = InflightLimiter(cfg.max_connections)
        self._url = {e: _join(cfg.base_url, p) for e, p in _PATHS.items()}
        self._headers = {"content-type": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            self._headers["authorization"] = f"Bearer {key}"

    @property
    def card(self) -> ModelCard:
        return self._card

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, ttl_dns_cache=300, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s, sock_read=self.cfg.read_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=self._headers, skip_auto_headers=("User-Agent",),
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check_health(self) -> None:
        if self._session is None or self._session.closed:
            raise EngineUnavailable("upstream session is not started")

    def stats(self) -> EngineStats:
        return EngineStats(running=self._admission.count)

    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        return await self._admission.admit(lambda: self._send(endpoint, body, request_id))

    async def _send(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        if self._session is None:
            raise EngineUnavailable("upstream session is not started")
        payload = orjson.dumps({**body, "model": self.upstream_model})
        try:
            headers = {"x-request-id": request_id}
            inject(headers)  # W3C traceparent of the caller's span, when tracing is on
            resp = await self._session.post(self._url[endpoint], data=payload, headers=headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise EngineUnavailable(f"upstream unreachable: {type(exc).__name__}") from None
        if resp.status >= 300:
            try:
                raw = await resp.read()
            finally:
                resp.release()
            raise upstream_error(resp.status, raw, resp.headers.get("retry-after"))
        if not body.get("stream"):
            try:
                return await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise EngineFailure(f"upstream broke off: {type(exc).__name__}") from None
            finally:
                resp.release()
        return self._stream(resp)

    async def _stream(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for chunk in reframe(resp.content):
                yield chunk
            finished = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineFailure(f"upstream stream broke off: {type(exc).__name__}") from None
        finally:
            if finished:
                resp.release()  # back to the pool
            else:
                resp.close()  # an unfinished stream drops its connection: the upstream sees the abort
