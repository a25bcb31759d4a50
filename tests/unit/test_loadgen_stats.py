"""The load generator's statistics against synthetic timings."""

from __future__ import annotations

import pytest

from benchmarks.loadgen import RequestRecord, percentile, summarize


def test_percentile_interpolates() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 100.0
    assert percentile([], 50) is None


def test_summarize_counts_tokens_errors_and_latencies() -> None:
    recs = [RequestRecord(ok=True, ttft_s=0.1 * (i + 1), e2e_s=1.0, output_tokens=10, itl_s=[0.01, 0.03])
            for i in range(4)]
    recs += [RequestRecord(ok=False, error="http_503"), RequestRecord(ok=False, error="http_503")]
    s = summarize(recs, wall_s=2.0)
    assert s["completed"] == 4 and s["requests"] == 6
    assert s["errors"] == {"http_503": 2}
    assert s["output_tok_per_s"] == pytest.approx(20.0) and s["req_per_s"] == pytest.approx(2.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.25) and s["itl_s"]["mean"] == pytest.approx(0.02)
