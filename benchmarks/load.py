"""Load points: closed loop (fixed concurrency) or open loop (Poisson arrivals), bounded in time and count."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from benchmarks.client import new_session, send
from benchmarks.stats import SLO, RequestRecord, in_window, summarize


@dataclass(frozen=True)
class Point:
    """One load level: `concurrency` workers (closed) or `rate` requests/s (open)."""

    mode: Literal["closed", "open"]
    level: float
    duration_s: float
    max_requests: int = 1_000_000
    warmup_s: float = 0.0
    max_inflight: int = 2048  # open loop: arrivals beyond this many outstanding are counted as `client_backlog`
    ramp_s: float = 0.0  # closed loop: the workers' first requests spread evenly over this many seconds

    @property
    def label(self) -> str:
        return f"c={int(self.level)}" if self.mode == "closed" else f"rate={self.level:g}/s"


class Progress:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, title: str, duration_s: float, enabled: bool | None = None) -> None:
        self.title, self.duration_s = title, duration_s
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.records: list[RequestRecord] = []
        self._task: asyncio.Task[None] | None = None

    def start(self, records: list[RequestRecord], at: float | None = None) -> None:
        """Show `records` from now, timed from `at` (default now; later: a warm-up counts down first)."""
        self.records, self.t0 = records, time.perf_counter() if at is None else at
        if self.enabled:
            self._task = asyncio.ensure_future(self._run())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        done = min(1.0, max(0.0, elapsed) / self.duration_s) if self.duration_s else 1.0
        bar = "#" * int(done * 24) + "-" * (24 - int(done * 24))
        bad = sum(1 for r in self.records if not r.ok)
        return (f"\r  {self.title:38s} [{bar}] {elapsed:5.1f}/{self.duration_s:g}s "
                f"{len(self.records) - bad:7d} ok {bad:5d} err")

    async def _run(self) -> None:
        while True:
            sys.stderr.write(self.line())
            sys.stderr.flush()
            await asyncio.sleep(0.25)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            sys.stderr.write(self.line() + "\n")
            sys.stderr.flush()


async def run_point(
    base_url: str, key: str | None, bodies: Iterator[dict[str, Any]], path: str, point: Point,
    slo: SLO | None = None, progress: Progress | None = None, seed: int = 0, timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Run one point and summarize it; requests still running at the end are waited for."""
    url = base_url.rstrip("/") + path
    conns = int(point.level) * 2 if point.mode == "closed" else point.max_inflight
    records: list[RequestRecord] = []
    warm: list[RequestRecord] = []
    window: tuple[float, int] | None = None
    async with new_session(key, max(conns, 4), timeout_s) as session:
        start = time.perf_counter()
        t0 = start + point.warmup_s
        if point.mode == "closed":
            # One loop through warm-up and measurement: a stream keeps its phase (its place in the engine's
            # batch) across the boundary. Latencies are those of the requests started in the window;
            # throughput counts what arrived in it, from every request (see `stats.in_window`).
            if progress is not None:
                progress.start(records, at=t0)
            try:
                await _closed(session, url, bodies, int(point.level), t0 + point.duration_s, point.max_requests,
                              records, t0, start, point.ramp_s, warm)
            finally:
                if progress is not None:
                    progress.stop()
            wall = min(point.duration_s, time.perf_counter() - t0)  # shorter: max_requests reached early
            window = in_window(records + warm, 0.0, wall)
        else:
            if point.warmup_s > 0:
                await _closed(session, url, bodies, 4, t0, 10**9, [], t0, start)
            if progress is not None:
                progress.start(records)
            t0 = time.perf_counter()
            try:
                await _open(session, url, bodies, point, t0 + point.duration_s, records, t0, random.Random(seed))
            finally:
                if progress is not None:
                    progress.stop()
            wall = time.perf_counter() - t0
    out = summarize(records, wall, slo, window)
    out.update({"mode": point.mode, "level": point.level, "duration_s": point.duration_s})
    return out


async def _closed(session: Any, url: str, bodies: Iterator[dict[str, Any]], workers: int, deadline: float,
                  max_requests: int, records: list[RequestRecord], t0: float, start: float | None = None,
                  ramp_s: float = 0.0, warm: list[RequestRecord] | None = None) -> None:
    """`workers` streams back to back from `start` (default now) until `deadline`.

    Worker i sends its first request at start + i * ramp_s / workers. Requests started before `t0` are warm-up:
    kept in `warm` (when given), not in `records`, and not counted against `max_requests`.
    """
    begin = time.perf_counter() if start is None else start
    sent = 0

    async def worker(i: int) -> None:
        nonlocal sent
        delay = begin + i * ramp_s / workers - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        while time.perf_counter() < deadline and sent < max_requests:
            measured = time.perf_counter() >= t0
            sent += measured
            rec = await send(session, url, next(bodies), t0)
            if measured:
                records.append(rec)
            elif warm is not None:
                warm.append(rec)

    await asyncio.gather(*(worker(i) for i in range(workers)))


async def _open(session: Any, url: str, bodies: Iterator[dict[str, Any]], point: Point, deadline: float,
                records: list[RequestRecord], t0: float, rng: random.Random) -> None:
    inflight: set[asyncio.Task[None]] = set()

    async def one(body: dict[str, Any]) -> None:
        records.append(await send(session, url, body, t0))

    next_at = t0
    sent = 0
    while sent < point.max_requests:
        next_at += rng.expovariate(point.level)
        if next_at >= deadline:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent += 1
        if len(inflight) >= point.max_inflight:
            records.append(RequestRecord(ok=False, error="client_backlog", start_s=time.perf_counter() - t0))
            continue
        task = asyncio.ensure_future(one(next(bodies)))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.gather(*inflight)
