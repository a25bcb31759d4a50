"""Closed-loop streaming load generator for any OpenAI-compatible endpoint (HTTP only).

`concurrency` workers each send a streaming completion, wait for its end, and send the
next, for `duration_s` (bounded in time and count). Per request: TTFT, inter-token
latencies, end-to-end latency, output tokens (from the usage chunk), errors by kind.

    python -m benchmarks.loadgen --base-url http://127.0.0.1:8000/v1 --key K --model M \
        --concurrency 16 --max-tokens 128 --duration 30 --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestRecord:
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Aggregate statistics of one load point."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1

    def dist(xs: list[float]) -> dict[str, float | None]:
        return {
            "mean": statistics.fmean(xs) if xs else None,
            "p50": percentile(xs, 50),
            "p90": percentile(xs, 90),
            "p99": percentile(xs, 99),
        }

    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": errors,
        "wall_s": wall_s,
        "req_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tok_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_s": dist(ttft),
        "itl_s": dist(itl),
        "e2e_s": dist(e2e),
    }


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> RequestRecord:
    start = time.perf_counter()
    last = start
    rec = RequestRecord(ok=False)
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                await resp.read()
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = "stream_error"
                    return rec
                now = time.perf_counter()
                choices = event.get("choices") or []
                if any(c.get("text") or (c.get("delta") or {}).get("content") for c in choices):
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                if event.get("usage"):
                    rec.output_tokens = int(event["usage"].get("completion_tokens") or 0)
        rec.e2e_s = time.perf_counter() - start
        rec.ok = rec.ttft_s is not None
        if not rec.ok:
            rec.error = "no_tokens"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        rec.error = type(exc).__name__
    return rec


async def run_point(
    base_url: str, key: str, model: str, concurrency: int, max_tokens: int, duration_s: float,
    prompt: str = "Write a story about a robot.", max_requests: int = 100_000, warmup: int = 0,
) -> dict[str, Any]:
    """One closed-loop load point; returns the summary plus the settings."""
    url = base_url.rstrip("/") + "/completions"
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conn = aiohttp.TCPConnector(limit=concurrency * 2, force_close=False)
    timeout = aiohttp.ClientTimeout(total=max(120.0, duration_s * 4))
    records: list[RequestRecord] = []
    async with aiohttp.ClientSession(connector=conn, headers=headers, timeout=timeout) as session:
        for _ in range(warmup):
            await one_request(session, url, body)
        deadline = time.perf_counter() + duration_s
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                records.append(await one_request(session, url, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    summary = summarize(records, wall)
    summary.update({"concurrency": concurrency, "max_tokens": max_tokens, "duration_s": duration_s})
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--key", default="")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    result = asyncio.run(run_point(a.base_url, a.key, a.model, a.concurrency, a.max_tokens, a.duration))
    text = json.dumps(result, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
