"""vLLM's per-step engine metrics, buffered before they reach Ray (serve/engine_metrics.py)."""

from __future__ import annotations

import asyncio

from serve.engine_metrics import MetricBuffer


class Series:
    """A buffered series: records what the buffer hands it."""

    def __init__(self) -> None:
        self.written: list[float] = []

    def write(self, value: float) -> None:
        self.written.append(value)


def test_gauges_keep_the_last_value_and_counters_the_sum() -> None:
    async def main() -> None:
        buf = MetricBuffer(flush_s=10)
        gauge, counter, other = Series(), Series(), Series()
        for v in (3, 5, 4):
            buf.set(gauge, (1, (("engine", "0"),)), v)
            buf.inc(counter, (2, (("engine", "0"),)), v)
        buf.inc(other, (2, (("engine", "1"),)), 7)  # same metric, other tags: its own series
        assert buf.pending == 3 and not gauge.written and not counter.written
        buf.flush()
        assert gauge.written == [4] and counter.written == [12] and other.written == [7]
        assert buf.pending == 0 and buf.flushes == 1
        buf.flush()  # nothing pending: nothing written twice
        assert gauge.written == [4] and counter.written == [12]

    asyncio.run(main())


def test_a_timer_on_the_loop_flushes_without_further_records() -> None:
    """An engine that goes idle still gets its last values out."""

    async def main() -> None:
        buf = MetricBuffer(flush_s=0.05)
        gauge = Series()
        buf.set(gauge, (1, ()), 2)
        buf.set(gauge, (1, ()), 0)  # one timer for both
        await asyncio.sleep(0.01)
        assert not gauge.written
        await asyncio.sleep(0.15)
        assert gauge.written == [0] and buf.flushes == 1
        buf.set(gauge, (1, ()), 9)  # after a flush the next record starts a new timer
        await asyncio.sleep(0.15)
        assert gauge.written == [0, 9] and buf.flushes == 2

    asyncio.run(main())


def test_zero_flush_interval_or_no_loop_writes_at_once() -> None:
    async def zero() -> Series:
        buf = MetricBuffer(flush_s=0)
        s = Series()
        buf.inc(s, (1, ()), 1)
        buf.inc(s, (1, ()), 2)
        return s

    assert asyncio.run(zero()).written == [1, 2]
    buf = MetricBuffer(flush_s=5)  # vLLM's synchronous LLM records outside any event loop
    s = Series()
    buf.set(s, (1, ()), 3)
    assert s.written == [3] and buf.pending == 0


def test_vllm_ray_wrappers_write_each_label_series_once_per_flush() -> None:
    """The installed vLLM's own Ray wrappers, buffered: `labels()` clones share the Ray metric and
    carry their own tags; every clone's series gets its last gauge value and its counter sum."""
    from serve.engine_metrics import buffered_ray_stat_logger

    class RayMetric:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, dict]] = []

        def set(self, value, tags=None) -> None:
            self.calls.append(("set", value, dict(tags or {})))

        def inc(self, value=1.0, tags=None) -> None:
            self.calls.append(("inc", value, dict(tags or {})))

    logger = buffered_ray_stat_logger(60)
    gauge = logger._gauge_cls.__new__(logger._gauge_cls)
    counter = logger._counter_cls.__new__(logger._counter_cls)
    for wrapper in (gauge, counter):
        wrapper.metric, wrapper._tags = RayMetric(), {}
    running = [gauge.labels(model_name="m", engine="0"), gauge.labels(model_name="m", engine="1")]
    tokens = [counter.labels(model_name="m", engine="0"), counter.labels(model_name="m", engine="1")]

    async def steps() -> None:
        for step in range(5):
            for engine in (0, 1):
                running[engine].set(step + engine)
                tokens[engine].inc(3)
                tokens[engine].inc(0)  # vLLM increments by 0 on idle steps: nothing to send
        assert gauge.metric.calls == [] and counter.metric.calls == []
        logger.metric_buffer.flush()

    asyncio.run(steps())
    assert sorted(gauge.metric.calls, key=lambda c: c[2]["engine"]) == [
        ("set", 4.0, {"model_name": "m", "engine": "0", "ReplicaId": ""}),
        ("set", 5.0, {"model_name": "m", "engine": "1", "ReplicaId": ""}),
    ]
    assert sorted(counter.metric.calls, key=lambda c: c[2]["engine"]) == [
        ("inc", 15.0, {"model_name": "m", "engine": "0", "ReplicaId": ""}),
        ("inc", 15.0, {"model_name": "m", "engine": "1", "ReplicaId": ""}),
    ]
