"""Per-request records and the statistics of a load point (pure; unit-tested on synthetic timings).

Definitions (as vLLM's and NVIDIA's benchmark tools use them):
- TTFT: request sent -> first content token received.
- ITL: gap between consecutive content-bearing chunks of one stream.
- TPOT: (end-to-end - TTFT) / (output tokens - 1), per request, for requests with > 1 token.
- Goodput: completed requests per second that met every SLO bound given.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds)."""

    ok: bool
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.e2e_s is None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    """Upper bounds a request must meet to count towards goodput (None: not bounded)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO:
        """`ttft=0.5,tpot=0.05,e2e=10` (seconds) -> SLO; empty -> no bounds."""
        bounds: dict[str, float] = {}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            name = name.strip().lower()
            if not sep or name not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"bad SLO term {part!r}: use ttft=S, tpot=S, e2e=S")
            bounds[f"{name}_s"] = float(value)
            if bounds[f"{name}_s"] <= 0:
                raise ValueError(f"SLO bound {name} must be > 0")
        return cls(**bounds)

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        for bound, value in ((self.ttft_s, r.ttft_s), (self.tpot_s, r.tpot_s), (self.e2e_s, r.e2e_s)):
            if bound is not None and value is not None and value > bound:
                return False
        return True

    def __str__(self) -> str:
        terms = [f"{n}={v:g}" for n, v in (("ttft", self.ttft_s), ("tpot", self.tpot_s), ("e2e", self.e2e_s)) if v]
        return ",".join(terms) or "none"


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(xs: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 of `xs` (None when empty)."""
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
    }


# Requests that start less than this apart belong to one burst (see `start_bursts`).
BURST_GAP_S = 0.005


def start_bursts(records: list[RequestRecord], gap_s: float = BURST_GAP_S) -> list[int]:
    """For every request, the size of the burst it started in: requests whose starts follow each other within
    `gap_s`. Closed-loop streams of a fixed length started together stay in step (they finish in the same engine
    step and are sent again at once); streams spread over time give bursts of about 1."""
    starts = sorted(r.start_s for r in records)
    sizes: list[int] = []
    run = 0
    for i, s in enumerate(starts):
        if i and s - starts[i - 1] > gap_s:
            sizes += [run] * run
            run = 0
        run += 1
    return sizes + [run] * run


def in_window(records: list[RequestRecord], lo: float, hi: float) -> tuple[float, int]:
    """Output tokens received and requests completed between `lo` and `hi` (the records' clock).

    A streamed response's tokens are counted at the events that carried them (its usage count spread evenly
    over its content events: exact when every event carries one token); a full response's at its end. Counting
    by arrival makes a closed loop's throughput exact whatever the streams' phases: a window cut through
    in-flight requests counts what arrived in it, not whole requests that started in it.
    """
    tokens, done = 0.0, 0
    for r in records:
        if not r.ok or r.e2e_s is None:
            continue
        ended = lo <= r.start_s + r.e2e_s < hi
        done += ended
        if r.ttft_s is None:
            tokens += r.output_tokens * ended
            continue
        t = r.start_s + r.ttft_s
        times = [t]
        for gap in r.itl_s:
            t += gap
            times.append(t)
        per_event = r.output_tokens / len(times)
        tokens += per_event * sum(1 for x in times if lo <= x < hi)
    return tokens, done


def summarize(records: list[RequestRecord], wall_s: float, slo: SLO | None = None,
              window: tuple[float, int] | None = None) -> dict[str, Any]:
    """Aggregate statistics of one load point.

    `window`: (output tokens, completed requests) received within the `wall_s` seconds measured (`in_window`);
    then throughput counts those, and latencies still come from `records` (the requests started in the window).
    Without it, throughput counts every completed request of `records` over `wall_s`.
    """
    slo = slo or SLO()
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kind = r.error or "unknown"
            errors[kind] = errors.get(kind, 0) + 1
    good = sum(1 for r in ok if slo.met(r))
    out_tokens: float = sum(r.output_tokens for r in ok)
    completed = len(ok)
    if window is not None:
        out_tokens, completed = window
    rate = (lambda n: n / wall_s) if wall_s > 0 else (lambda n: 0.0)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": errors,
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "wall_s": wall_s,
        "req_per_s": rate(completed),
        "output_tok_per_s": rate(out_tokens),
        "goodput_req_per_s": rate(good),
        "slo": str(slo),
        "slo_attainment": good / len(records) if records else None,
        "ttft_s": dist([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": dist([x for r in ok for x in r.itl_s]),
        "tpot_s": dist([t for r in ok if (t := r.tpot_s) is not None]),
        "e2e_s": dist([r.e2e_s for r in ok if r.e2e_s is not None]),
        "start_burst": dist([float(n) for n in start_bursts(records)]),
    }


# Figures kept round by round, so a ratio between two targets pairs the rounds (see `report.paired_ratio`).
PAIRED = ("req_per_s", "req_per_cpu_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "clumped_share",
          "frontend_cpu_s_per_1k_tokens")


def metric(point: dict[str, Any], name: str) -> float | None:
    """A point's figure by goal-metric name (latencies in ms: `ttft_p50_ms`, `itl_p99_ms`, ...)."""
    for q in ("p50", "p99"):
        if name.endswith(f"_{q}_ms"):
            value = (point.get(name[: -len(f"_{q}_ms")] + "_s") or {}).get(q)
            return None if value is None else value * 1000
    return point.get(name)


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's point measured in several rounds: the round with the median req/s, with every round's figures.

    A whole round is kept (not a median per statistic), so its latencies, CPU and errors belong together. With
    an even number of rounds the lower middle one is kept. `rounds_<figure>` lists each figure of `PAIRED` round by
    round, where every round measured it.
    """
    ranked = sorted(rounds, key=lambda r: r["req_per_s"])
    out = dict(ranked[(len(ranked) - 1) // 2])
    for name in PAIRED:
        values = [metric(r, name) for r in rounds]
        if all(v is not None for v in values):
            out["rounds_" + name] = values
    return out
