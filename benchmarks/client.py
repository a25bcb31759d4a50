"""One benchmark request over HTTP (aiohttp), streaming or not, timed as the client sees it."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson

from benchmarks.stats import RequestRecord


def _has_content(choices: list[dict[str, Any]]) -> bool:
    for c in choices:
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return True
    return False


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], t0: float) -> RequestRecord:
    """POST `body`; `t0` is the benchmark's clock origin (records keep start times relative to it)."""
    start = time.perf_counter()
    rec = RequestRecord(ok=False, start_s=start - t0)
    try:
        async with session.post(url, data=orjson.dumps(body)) as resp:
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                await resp.read()
                return rec
            if not body.get("stream"):
                doc = orjson.loads(await resp.read())
                rec.e2e_s = time.perf_counter() - start
                usage = doc.get("usage") or {}
                rec.output_tokens = int(usage.get("completion_tokens") or 0)
                rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                rec.ok = True
                return rec
            last = start
            async for raw in resp.content:
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                event = orjson.loads(data)
                if "error" in event:
                    rec.error = "stream_error"
                    return rec
                if _has_content(event.get("choices") or []):
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                usage = event.get("usage")
                if usage:
                    rec.output_tokens = int(usage.get("completion_tokens") or 0)
                    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            rec.e2e_s = time.perf_counter() - start
            rec.ok = rec.ttft_s is not None
            if not rec.ok:
                rec.error = "no_tokens"
            elif not rec.output_tokens:  # no usage chunk: count content events
                rec.output_tokens = len(rec.itl_s) + 1
    except TimeoutError:
        rec.error = "timeout"
    except aiohttp.ClientError as exc:
        rec.error = type(exc).__name__
    except orjson.JSONDecodeError:
        rec.error = "bad_json"
    return rec


def new_session(key: str | None, connections: int, timeout_s: float) -> aiohttp.ClientSession:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        skip_auto_headers=("User-Agent",),
    )
