"""Batching a stream's events into fewer messages (each Ray handle message costs far more than an event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


async def coalesce(events: AsyncIterator[bytes], window_s: float) -> AsyncIterator[bytes]:
    """`events` regrouped: the first at once, then all that arrive within `window_s` of a batch's first, joined.

    Nothing is held back longer than the window, and what is pending when the source
    ends or fails is sent before the end or the error. Closing this iterator closes `events`.
    """
    if window_s <= 0:
        try:
            async for event in events:
                yield event
        finally:
            await _close(events)
        return
    loop = asyncio.get_running_loop()
    source = aiter(events)
    pending: list[bytes] = []
    nxt: asyncio.Future[bytes] | None = None
    first = True
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(anext(source))
            if not pending:
                try:
                    pending.append(await nxt)
                except StopAsyncIteration:
                    return
                nxt = None
                if first:
                    first = False
                    yield pending.pop()
                    continue
                deadline = loop.time() + window_s
                continue
            done, _ = await asyncio.wait({nxt}, timeout=max(0.0, deadline - loop.time()))
            if not done:  # the window closed: send what it gathered
                yield b"".join(pending)
                pending.clear()
                continue
            try:
                pending.append(nxt.result())
            except StopAsyncIteration:
                yield b"".join(pending)
                pending.clear()
                return
            except BaseException:
                yield b"".join(pending)  # what was made before the failure still reaches the client
                pending.clear()
                raise
            nxt = None
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            try:
                await nxt
            except BaseException:  # noqa: BLE001, S110 - the source's end or cancellation: nothing to report
                pass
        await _close(events)


async def _close(events: AsyncIterator[bytes]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
