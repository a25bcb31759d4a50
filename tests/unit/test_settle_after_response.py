"""The quota settlement runs after the body is sent, and also when sending fails."""

from __future__ import annotations

import pytest
from starlette.background import BackgroundTask

from gateway.app import SettleAfterResponse


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
