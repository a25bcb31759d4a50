"""Prometheus metrics of the gateway: what was asked, how it went, how fast.

One `GatewayMetrics` per app, on a registry of its own. The request path only adds to
plain dictionaries (`count`, `observe`, `in_flight_add`: well under a microsecond each);
`flush` moves what gathered into the Prometheus values at most once a second (a timer on
the event loop) and before every scrape. Where `PROMETHEUS_MULTIPROC_DIR`
is set when the process starts (the builder sets it for every gateway replica; set it
yourself for several `raygate gateway` workers), every process writes its samples to
that directory and `/metrics` of any of them reports the sum of all: counts stay right
however many replicas or workers share a node.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_S = 1.0  # longest a sample waits before other processes' scrapes see it

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)

# Every series the gateway exports (deploy/observability and its tests refer to these names).
METRIC_NAMES = (
    "raygate_requests_total",
    "raygate_request_duration_seconds",
    "raygate_time_to_first_token_seconds",
    "raygate_inter_token_latency_seconds",
    "raygate_prompt_tokens_total",
    "raygate_completion_tokens_total",
    "raygate_requests_in_flight",
    "raygate_quota_rejections_total",
    "raygate_quota_unchecked_admissions_total",
    "raygate_fallbacks_total",
    "raygate_slo_requests_total",
)


def multiprocess_dir() -> Path | None:
    """The shared directory of this process's metrics, or None when it keeps its own."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GatewayMetrics:
    """The gateway's series; `render()` is the `/metrics` body."""

    def __init__(self, shared_dir: Path | None = None) -> None:
        self.shared_dir = shared_dir
        reg = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "raygate_requests", "Requests by model, served version, key tier, HTTP status and endpoint "
            "(chat, completion, responses, messages).",
            ["model", "version", "tier", "status", "endpoint"], registry=reg,
        )
        self.duration = Histogram(
            "raygate_request_duration_seconds", "End-to-end time from request to last byte.",
            ["model"], buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.ttft = Histogram(
            "raygate_time_to_first_token_seconds", "Time to the first streamed event (streams only).",
            ["model"], buckets=TTFT_BUCKETS, registry=reg,
        )
        self.itl = Histogram(
            "raygate_inter_token_latency_seconds",
            "Mean time between output tokens of a stream, one observation per request.",
            ["model"], buckets=ITL_BUCKETS, registry=reg,
        )
        self.prompt_tokens = Counter("raygate_prompt_tokens", "Prompt tokens processed.", ["model"], registry=reg)
        self.completion_tokens = Counter(
            "raygate_completion_tokens", "Completion tokens generated.", ["model"], registry=reg
        )
        self.in_flight = Gauge(
            "raygate_requests_in_flight", "Requests admitted and not finished.", ["model"],
            registry=reg, multiprocess_mode="livesum",
        )
        self.quota_rejections = Counter(
            "raygate_quota_rejections", "Requests refused by a quota, by kind "
            "(requests, tokens, concurrent, day, month, unavailable).", ["kind"], registry=reg,
        )
        self.quota_unchecked = Counter(
            "raygate_quota_unchecked_admissions", "Requests admitted without a quota check: the quota store was "
            "unreachable and quota_failure_mode is fail_open.", registry=reg,
        )
        self.fallbacks = Counter(
            "raygate_fallbacks", "Requests served by a later target of their route than the first.",
            ["model", "target"], registry=reg,
        )
        self.slo = Counter(
            "raygate_slo_requests", "Successful requests per key that met or missed the TTFT/TPOT targets.",
            ["key", "result"], registry=reg,
        )
        self._counts: dict[tuple[Counter, tuple[str, ...]], float] = {}
        self._hists: dict[tuple[Histogram, str], list[float]] = {}
        self._bounds = {id(h): h._upper_bounds[:-1] for h in (self.duration, self.ttft, self.itl)}
        self._in_flight: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    # -- the request path: plain dictionaries -------------------------------------------
    def count(self, counter: Counter, labels: tuple[str, ...], n: float = 1.0) -> None:
        key = (counter, labels)
        self._counts[key] = self._counts.get(key, 0.0) + n
        self._schedule()

    def observe(self, hist: Histogram, label: str, value: float) -> None:
        key = (hist, label)
        bounds = self._bounds[id(hist)]
        cells = self._hists.get(key)
        if cells is None:
            cells = self._hists[key] = [0.0] * (len(bounds) + 2)  # buckets, +Inf, then the sum
        cells[bisect_left(bounds, value)] += 1
        cells[-1] += value

    def in_flight_add(self, model: str, n: int) -> None:
        self._in_flight[model] = self._in_flight.get(model, 0) + n
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self._tick)
            except RuntimeError:  # no loop (a test calling directly): the next scrape flushes
                pass

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Move what gathered since the last flush into the Prometheus values."""
        counts, self._counts = self._counts, {}
        for (counter, labels), n in counts.items():
            (counter.labels(*labels) if labels else counter).inc(n)
        hists, self._hists = self._hists, {}
        for (hist, label), cells in hists.items():
            child: Any = hist.labels(label)
            # prometheus_client keeps a histogram as per-bucket counts and a sum (`_buckets`, `_sum`);
            # adding whole counts at once is what `observe` does one sample at a time.
            for i, n in enumerate(cells[:-1]):
                if n:
                    child._buckets[i].inc(n)
            child._sum.inc(cells[-1])
        for model, n in self._in_flight.items():
            self.in_flight.labels(model).set(n)

    @classmethod
    def create(cls) -> GatewayMetrics:
        return cls(multiprocess_dir())

    def render(self) -> tuple[bytes, str]:
        """The exposition text: this process's series, or every process's in the shared directory."""
        self.flush()
        if self.shared_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        self._forget_dead_processes()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.shared_dir))
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def _forget_dead_processes(self) -> None:
        """Drop the live gauges (in-flight) of processes that are gone; their counters stay summed."""
        from prometheus_client import multiprocess

        assert self.shared_dir is not None
        for path in self.shared_dir.glob("gauge_live*_*.db"):
            pid = path.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), str(self.shared_dir))

    def close(self) -> None:
        """This process is stopping: write what gathered; its in-flight gauge leaves the sum."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self.shared_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), str(self.shared_dir))
