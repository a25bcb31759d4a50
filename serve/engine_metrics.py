"""vLLM's engine metrics through Ray's metrics export, at a cost the replica's event loop can carry.

vLLM's stat logger records once per engine step, on the event loop that also relays tokens: about
fifteen gauge sets and counter increments per step, each a `ray.util.metrics` call that copies and
checks its tags (54-65 us of the loop per step, 26-28 us buffered: commit ae2e204).
Here gauges keep the last value and counters the sum, both in plain dictionaries,
and reach Ray at most every `flush_s` (a timer on the loop, so an idle engine's last values still
go out). Ray exports every few seconds, so the series scraped are the same; histograms (observed
per request) pass straight through. vLLM is imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
from typing import Any

# vLLM histograms observed once per generated token. Ray's metrics agent rebuilds a histogram by
# replaying every observation in Python (ray-project/ray#64852): at 2,000 tok/s this one series cost
# the node's agent 7-8% of a core on 2 cores, taken from the engine. The gateway exports the
# inter-token latency clients see (raygate_inter_token_latency_seconds); vLLM's per-request
# histograms (TTFT, TPOT, queue, e2e) stay.
PER_TOKEN_HISTOGRAMS = ("histogram_inter_token_latency",)

SeriesKey = tuple[int, tuple[tuple[str, str], ...]]  # a Ray metric's id and its sorted tags


class _Unrecorded:
    """Stands in for a histogram left out of the export."""

    def observe(self, value: float) -> None:
        pass


def without_per_token_histograms(base: type) -> type:
    """`base` (a vLLM stat logger class) with the histograms in PER_TOKEN_HISTOGRAMS unrecorded."""

    class RayEngineStatLogger(base):
        """vLLM's Ray stat logger without its per-token histograms (see PER_TOKEN_HISTOGRAMS)."""

        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            super().__init__(vllm_config, engine_indexes)
            for attr in PER_TOKEN_HISTOGRAMS:
                setattr(self, attr, {idx: _Unrecorded() for idx in getattr(self, attr)})

    return RayEngineStatLogger


class MetricBuffer:
    """Gauge values and counter increments waiting for the next flush, by series (metric and tags).

    At a flush each buffered series' own `write(value)` does what the metric would have done, so the
    buffer holds no Ray import.
    """

    def __init__(self, flush_s: float) -> None:
        self.flush_s = flush_s
        self._gauges: dict[SeriesKey, tuple[Any, float]] = {}
        self._counters: dict[SeriesKey, tuple[Any, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.flushes = 0

    def set(self, series: Any, key: SeriesKey, value: float) -> None:
        self._gauges[key] = (series, value)
        self._schedule()

    def inc(self, series: Any, key: SeriesKey, amount: float) -> None:
        held = self._counters.get(key)
        self._counters[key] = (series, amount + (held[1] if held else 0.0))
        self._schedule()

    @property
    def pending(self) -> int:
        return len(self._gauges) + len(self._counters)

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        if self.flush_s <= 0:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # recorded outside a loop (vLLM's synchronous LLM): nothing to wait on
            self.flush()
            return
        self._timer = loop.call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        """Hand every pending value to its metric (also at shutdown: vLLM's logger calls it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gauges, self._gauges = self._gauges, {}
        counters, self._counters = self._counters, {}
        for series, value in gauges.values():
            series.write(value)
        for series, amount in counters.values():
            series.write(amount)
        self.flushes += 1


def buffered_ray_stat_logger(flush_s: float) -> type:
    """vLLM's Ray stat logger whose gauges and counters reach Ray at most every `flush_s` seconds.

    Also without its per-token histograms (PER_TOKEN_HISTOGRAMS). `flush_s` 0: every value at once,
    as vLLM does.
    """
    from vllm.v1.metrics.ray_wrappers import RayCounterWrapper, RayGaugeWrapper, RayPrometheusStatLogger

    buffer = MetricBuffer(flush_s)

    class BufferedGauge(RayGaugeWrapper):
        """A Ray gauge that keeps its last value until the buffer flushes."""

        def set(self, value: int | float) -> None:
            buffer.set(self, _key(self), float(value))

        def write(self, value: float) -> None:
            self.metric.set(value, tags=self._tags)  # type: ignore[attr-defined]  # a ray.util.metrics.Gauge

    class BufferedCounter(RayCounterWrapper):
        """A Ray counter that sums its increments until the buffer flushes."""

        def inc(self, value: int | float = 1.0) -> None:
            if value:
                buffer.inc(self, _key(self), float(value))

        def write(self, amount: float) -> None:
            if amount > 0:
                self.metric.inc(amount, tags=self._tags)  # type: ignore[attr-defined]  # a ray.util.metrics.Counter

    base = without_per_token_histograms(RayPrometheusStatLogger)

    class BufferedRayStatLogger(base):  # type: ignore[misc, valid-type]
        """vLLM's Ray stat logger, its gauges and counters buffered (serve/engine_metrics.py)."""

        _gauge_cls = BufferedGauge
        _counter_cls = BufferedCounter
        metric_buffer = buffer

        def log(self) -> None:  # vLLM's periodic log, and the last call before the engine shuts down
            buffer.flush()
            super().log()

    return BufferedRayStatLogger


def _key(wrapper: Any) -> SeriesKey:
    """The series `wrapper` writes: its Ray metric and tags (cached while its tags are the same object;
    `labels()` copies the wrapper with a new tags dict)."""
    cached = wrapper.__dict__.get("_buffer_key")
    tags = wrapper._tags  # noqa: SLF001 - vLLM's wrappers keep their tags there
    if cached is None or cached[0] is not tags:
        cached = wrapper._buffer_key = (tags, (id(wrapper.metric), tuple(sorted(tags.items()))))  # noqa: SLF001
    return cached[1]


class SchedulerLoad:
    """An engine's scheduler as of its last step: requests waiting and the share of KV cache in use (what
    Serve's autoscaler reads through `serve.engine.autoscaling_stats`). `stat_logger()` is the vLLM stat
    logger that keeps it current: two attribute writes per step."""

    def __init__(self) -> None:
        self.waiting = 0
        self.kv_cache_usage = 0.0

    def stat_logger(self) -> type:
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self

        class SchedulerLoadLogger(StatLoggerBase):
            """Keeps the last step's scheduler load on the engine (serve/engine_metrics.SchedulerLoad)."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    load.waiting = scheduler_stats.num_waiting_reqs
                    load.kv_cache_usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self) -> None:
                pass

        return SchedulerLoadLogger


def engine_stat_loggers(flush_s: float, load: SchedulerLoad) -> list[Any]:
    """vLLM's stat loggers for an engine: its scheduler load kept for the autoscaler; inside a Ray worker, vLLM's
    metrics through Ray's metrics export (one series per replica, tagged ReplicaId, on every node's metrics port)
    instead of this process's registry (outside Ray, vLLM adds its own Prometheus logger beside these)."""
    import ray

    loggers = [load.stat_logger()]
    if ray.is_initialized():
        loggers.append(buffered_ray_stat_logger(flush_s))
    return loggers
