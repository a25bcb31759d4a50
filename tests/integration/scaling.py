"""What the autoscaling tests share: replica counts from Serve, a closed-loop load in a thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx


def running_replicas(deployment: str, app: str = "raygate") -> int:
    """RUNNING replicas of `deployment` as Serve reports them."""
    from ray import serve

    dep = serve.status().applications[app].deployments[deployment]
    return sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


class ClosedLoad:
    """`workers` clients posting `body` back to back until the block ends; `codes` holds every outcome.

    A streamed 200 that does not end with `data: [DONE]` counts as -1, so a broken stream is not a success.
    """

    def __init__(self, base_url: str, key: str, body: dict[str, Any], workers: int = 12) -> None:
        self.base_url, self.key, self.body, self.workers = base_url, key, body, workers
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60,
                                     headers={"authorization": f"Bearer {self.key}"}) as c:
            async def worker() -> None:
                while not self._stop.is_set():
                    r = await c.post("/v1/chat/completions", json=self.body)
                    whole = not self.body.get("stream") or r.text.endswith("data: [DONE]\n\n")
                    self.codes.append(r.status_code if r.status_code != 200 or whole else -1)

            await asyncio.gather(*(worker() for _ in range(self.workers)))

    def __enter__(self) -> ClosedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def outcomes(self) -> dict[int, int]:
        return {c: self.codes.count(c) for c in set(self.codes)}
