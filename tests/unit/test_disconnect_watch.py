"""A full response: the gateway aborts the engine call when the client leaves or the deadline passes, before it answers.

Streams are Serve's to watch until their first event (it cancels the request's task), then Starlette's."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.backend import ModelBackend
from gateway.dispatch import ClientDisconnected, generate
from gateway.errors import RequestTimeout
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine


class _Request:
    """What `generate` reads of a Starlette request: `receive`, which reports the client leaving after `leave_s`."""

    def __init__(self, leave_s: float | None) -> None:
        self.leave_s = leave_s

    async def receive(self) -> dict[str, Any]:
        if self.leave_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.leave_s)
        return {"type": "http.disconnect"}


async def _generate(engine: FakeEngine, leave_s: float | None, timeout_s: float = 30.0) -> Any:
    body = {"model": "m", "prompt": "hi", "max_tokens": 4}
    return await generate(None, engine, ["m"], "completion", body, "rid", _Request(leave_s), timeout_s)  # type: ignore[arg-type]


async def test_client_leaving_aborts_the_engine_call_before_the_gateway_answers() -> None:
    engine = FakeEngine("m", FakeEngineConfig(ttft_ms=2000))
    started = asyncio.get_running_loop().time()
    with pytest.raises(ClientDisconnected):
        await _generate(engine, leave_s=0.05)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert engine.stats().running == 0  # the engine's slot is free: the call was cancelled, not left running


async def test_a_client_that_stays_gets_its_answer_and_no_watcher_is_left() -> None:
    engine = FakeEngine("m", FakeEngineConfig(ttft_ms=10, itl_ms=1))
    before = len(asyncio.all_tasks())
    result, used, fallbacks = await _generate(engine, leave_s=None)
    assert used is engine and fallbacks == 0
    assert b'"choices"' in result
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


async def test_a_full_response_past_its_deadline_is_a_timeout() -> None:
    engine = FakeEngine("m", FakeEngineConfig(ttft_ms=2000))
    with pytest.raises(RequestTimeout):
        await _generate(engine, leave_s=None, timeout_s=0.05)
    assert engine.stats().running == 0


async def test_an_outside_cancellation_stays_a_cancellation() -> None:
    """Serve cancelling the request (its own disconnect watcher, shutdown) is not turned into a 499."""
    engine = FakeEngine("m", FakeEngineConfig(ttft_ms=2000))
    task = asyncio.ensure_future(_generate(engine, leave_s=None))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_timeout_reaches_the_client_as_an_openai_error(tmp_path: Path) -> None:
    key = "test-key-0123456789abcdef"
    engine = FakeEngine("m", FakeEngineConfig(ttft_ms=2000))
    app = create_app(GatewaySettings(api_keys=[key], home=tmp_path, request_timeout_s=0.05), ModelBackend({"m": engine}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        r = await http.post("/v1/completions", headers={"authorization": f"Bearer {key}"},
                            json={"model": "m", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 504
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert err["code"] is None or isinstance(err["code"], str)
    assert engine.stats().running == 0
