"""Soak: steady load on one target for a long time, RSS of its processes sampled, drift reported.

Drift of a process group = (median of the last 3 samples - median of the first 3 after
warm-up) / the latter. Target: within +-10 %.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.load import Point, Progress, run_point
from benchmarks.procs import rss_by_name
from benchmarks.runner import Runner
from benchmarks.stats import SLO


def drift(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per process group: start and end RSS (MB, medians of 3 samples) and the drift in %."""
    steady = [s for s in samples if s["t_s"] >= warmup_s] or samples
    names = sorted({n for s in steady for n in s["rss_mb"]})
    out = {}
    for name in [*names, "total"]:
        series = [s["rss_mb"].get(name) if name != "total" else sum(s["rss_mb"].values()) for s in steady]
        series = [x for x in series if x is not None]
        if len(series) < 2:
            continue
        first, last = statistics.median(series[:3]), statistics.median(series[-3:])
        out[name] = {"start_mb": round(first, 1), "end_mb": round(last, 1),
                     "drift_pct": round(100 * (last - first) / first, 2) if first else 0.0}
    return out


async def _sample(pids: list[int], every_s: float, t0: float, into: list[dict[str, Any]]) -> None:
    while True:
        rss: dict[str, float] = {}
        for pid in pids:
            for name, b in rss_by_name(pid).items():
                rss[name] = rss.get(name, 0.0) + b / 2**20
        into.append({"t_s": round(time.perf_counter() - t0, 1), "rss_mb": {k: round(v, 1) for k, v in rss.items()}})
        await asyncio.sleep(every_s)


def soak(runner: Runner, target_name: str | None, concurrency: int, minutes: float, sample_s: float,
         warmup_s: float) -> dict[str, Any]:
    sc = runner.sc
    wanted = next((t for t in sc.targets if t.name == target_name), None) if target_name else \
        next(t for t in sc.targets if t.measure)
    if wanted is None:
        raise ValueError(f"no target {target_name!r} in scenario {sc.name}")
    helpers = [t for t in sc.targets if not t.measure]
    with runner.up([*helpers, wanted]) as running:
        r = running[-1]
        wl = sc.workloads[0]
        point = Point("closed", concurrency, minutes * 60, warmup_s=0.0)
        samples: list[dict[str, Any]] = []

        async def go() -> dict[str, Any]:
            sampler = asyncio.ensure_future(_sample(r.pids, sample_s, time.perf_counter(), samples))
            try:
                return await run_point(r.base_url, r.key, wl.bodies(r.target.model), wl.path(), point,
                                       SLO.parse(sc.slo), Progress(f"soak {r.target.name}", point.duration_s,
                                                                    runner.progress))
            finally:
                sampler.cancel()

        summary = asyncio.run(go())
    return {"target": wanted.name, "workload": wl.name, "concurrency": concurrency, "minutes": minutes,
            "sample_s": sample_s, "warmup_s": warmup_s, "summary": summary, "samples": samples,
            "drift": drift(samples, warmup_s)}


def write(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(result, indent=1))
    d = result["drift"]
    s = result["summary"]
    lines = [f"# Soak: {result['target']}, {result['minutes']:g} min at concurrency {result['concurrency']}", "",
             f"{s['completed']} requests, {s['req_per_s']:.1f} req/s, {s['output_tok_per_s']:.1f} tok/s, errors "
             f"{sum(s['errors'].values())}; RSS sampled every {result['sample_s']:g} s, drift measured after "
             f"{result['warmup_s']:g} s of warm-up.", "",
             "| process | start MB | end MB | drift % | within +-10 % |", "|---|---|---|---|---|"]
    for name, v in d.items():
        lines.append(f"| {name} | {v['start_mb']} | {v['end_mb']} | {v['drift_pct']:+.2f} | "
                     f"{'yes' if abs(v['drift_pct']) <= 10 else '**no**'} |")
    (out_dir / "soak.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = sorted((n for n in d if n != "total"), key=lambda n: -d[n]["end_mb"])[:8]  # the largest
    for name in names:
        ax.plot([x["t_s"] / 60 for x in result["samples"]], [x["rss_mb"].get(name, 0) for x in result["samples"]],
                label=name)
    ax.set(title="RSS during the soak (the 8 largest processes)", xlabel="minutes", ylabel="MB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_dir / "soak-rss.png", dpi=90)
    plt.close(fig)
    return [out_dir / "soak.json", out_dir / "soak.md", out_dir / "soak-rss.png"]
