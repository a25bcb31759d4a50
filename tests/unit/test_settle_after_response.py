"""The quota settlement runs after the body is sent, and also when sending fails."""

from __future__ import annotations

import pytest
from starlette.background import BackgroundTask

from gateway.streaming import SettleAfterResponse


@pytest.mark.parametrize("send_fails", [False, True])
async def test_settles_even_when_send_fails(send_fails: bool) -> None:
    settled: list[int] = []
    sent: list[str] = []

    async def settle() -> None:
        settled.append(1)

    async def send(message: dict) -> None:
        sent.append(message["type"])
        if send_fails and message["type"] == "http.response.body":
            raise OSError("client went away")

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    resp = SettleAfterResponse(b"{}", media_type="application/json", background=BackgroundTask(settle))
    if send_fails:
        with pytest.raises(OSError):
            await resp({"type": "http"}, receive, send)
    else:
        await resp({"type": "http"}, receive, send)
        assert sent == ["http.response.start", "http.response.body"]
    assert settled == [1]


async def test_a_dropped_stream_settles_under_anyio_cancellation() -> None:
    """Starlette cancels a streaming response's task group when the client leaves (ASGI < 2.4, as in Serve);
    anyio then cancels every later await. The engine's stream must still close and `finish` still run."""
    import asyncio

    import anyio

    from gateway.dispatch import Started
    from gateway.governance.gate import Outcome
    from gateway.streaming import relay

    closed: list[bool] = []
    finished: list[bool] = []

    async def engine_stream():  # noqa: ANN202
        try:
            while True:
                await asyncio.sleep(0.01)
                yield b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        finally:
            closed.append(True)

    async def finish(client_left: bool) -> None:
        await asyncio.sleep(0)  # the quota store and the ledger are awaited too
        finished.append(client_left)

    outcome = Outcome()
    events = relay(Started(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n', engine_stream()),
                   outcome, True, "rid", finish)

    async def consume() -> None:
        async for _ in events:
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await asyncio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert closed == [True] and finished == [True]
    assert outcome.events >= 2
