"""Reports of a run: results.json, results.md (points, ratios, goals) and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.scenario import Goal
from benchmarks.stats import PAIRED, metric
from benchmarks.vllm_client import frontend_by_role


def paired_ratio(point: dict[str, Any], base: dict[str, Any], key: str = "req_per_s") -> float | None:
    """`key` (req/s, req per CPU-second, tok/s, TTFT p50 in ms) of `point` over `base`: the median of the
    round-by-round ratios when both were measured in the same rounds or cycles.

    Within a round the two ran seconds apart (or at the same time), so each ratio cancels the machine's
    slower drift; the median drops the rounds a burst of noise hit. Each figure is paired on its own: the row
    shown for a target is its median-req/s round, whose TTFT may be an outlier.
    """
    mine, theirs = point.get("rounds_" + key) or [], base.get("rounds_" + key) or []
    if len(mine) > 1 and len(mine) == len(theirs) and all(theirs):
        return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))
    value, ref = metric(point, key), metric(base, key)
    return value / ref if ref and value is not None else None


def paired_delta(point: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    """`key` of `point` minus `base`'s: the median of the round-by-round differences where both have them."""
    mine, theirs = point.get("rounds_" + key) or [], base.get("rounds_" + key) or []
    if len(mine) > 1 and len(mine) == len(theirs):
        return statistics.median(a - b for a, b in zip(mine, theirs, strict=True))
    value, ref = metric(point, key), metric(base, key)
    return value - ref if value is not None and ref is not None else None


def _find(points: list[dict[str, Any]], target: str, workload: str, level: float) -> dict[str, Any] | None:
    return next((p for p in points if p["target"] == target and p["workload"] == workload and p["level"] == level), None)


def check_goals(goals: list[Goal], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every goal on every point it applies to: the figure and whether it is met."""
    out = []
    for g in goals:
        for p in points:
            if p["target"] != g.target or (g.workloads and p["workload"] not in g.workloads):
                continue
            if g.levels and p["level"] not in g.levels:
                continue
            value = metric(p, g.metric)
            ref = other = None
            if g.vs is not None:
                other = _find(points, g.vs, p["workload"], p["level"])
                ref = metric(other, g.metric) if other else None
            if value is None or (g.vs is not None and (ref is None or (g.compare == "ratio" and not ref))):
                figure = None
            elif g.compare == "ratio" and g.metric in PAIRED and other is not None:
                figure = paired_ratio(p, other, g.metric)
            elif g.compare == "ratio":
                figure = value / ref if ref else None
            elif g.compare == "delta" and g.metric in PAIRED and other is not None:
                figure = paired_delta(p, other, g.metric)
            elif g.compare == "delta":
                figure = value - (ref or 0.0)
            else:
                figure = value
            met = figure is not None and (g.min is None or figure >= g.min) and (g.max is None or figure <= g.max)
            out.append({"goal": g.name, "workload": p["workload"], "level": p["level"], "figure": figure, "met": met,
                        "bound": f"{'>= ' + format(g.min, 'g') if g.min is not None else ''}"
                                 f"{'<= ' + format(g.max, 'g') if g.max is not None else ''}"})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _points(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _by_round(p: dict[str, Any], base: dict[str, Any], key: str = "req_per_s") -> str:
    """`key` of `p` over `base`, round by round (each round measured both)."""
    mine, theirs = p.get("rounds_" + key) or [], base.get("rounds_" + key) or []
    return " ".join(f"{a / b:.2f}" if b else "-" for a, b in zip(mine, theirs, strict=False)) or "-"


def _frontend_table(points: list[dict[str, Any]]) -> list[str]:
    """Where each target's front-end CPU goes at the workload's highest level: CPU-seconds per 1,000 output tokens
    by role (`vllm_client.frontend_by_role`), from the row each target's point shows."""
    level = max(p["level"] for p in points)
    shown = [p for p in points if p["level"] == level and p.get("frontend_cpu_s_per_1k_tokens")]
    per_1k = {}
    for p in shown:  # the point's own figure, shared out in proportion to each role's CPU-seconds
        by_role = frontend_by_role(p["target_cpu_s_by_process"])
        scale = p["frontend_cpu_s_per_1k_tokens"] / (sum(by_role.values()) or 1.0)
        per_1k[p["target"]] = {role: cpu_s * scale for role, cpu_s in by_role.items()}
    if not per_1k:
        return []
    roles = list(dict.fromkeys(role for by_role in per_1k.values() for role in by_role))
    lines = ["", f"Front-end CPU-s per 1k output tokens by process at {level:g} (vLLM's engine core and workers left "
             "out; the same rows as above):", "", "| process | " + " | ".join(per_1k) + " |",
             "|---|" + "---|" * len(per_1k)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(_num(by_role.get(role), ".4f") for by_role in per_1k.values()) + " |")
    lines.append("| **all** | " + " | ".join(_num(sum(by_role.values()), ".4f") for by_role in per_1k.values()) + " |")
    return lines


def markdown(run: dict[str, Any]) -> str:
    sc = run["scenario"]
    pts = run["points"]
    lines = [f"# {sc['name']}", "", sc.get("description", "").strip(), "",
             f"Load: {sc['load']['mode']} loop, {sc['load']['duration_s']:g} s per point; SLO {sc['slo'] or 'none'}; "
             f"{run['machine']['cpus']} CPUs; run took {run['wall_s']:.0f} s.", ""]
    cycles = sc["load"].get("cycles", 1)
    rounds = sc["load"].get("rounds", 1) * cycles
    together = bool(sc["load"].get("together"))
    if together:
        lines += [f"Every point was measured in {rounds} round(s); within a round **all targets ran at the same "
                  "time**, each with its own clients at the level, so the machine's bursts and drift hit them alike. "
                  "`req/CPU-s` is requests per CPU-second of the target's own processes (its cost per request, "
                  "inverted); its ratio is the median of the round-by-round ratios. Sharing the cores with one load "
                  "generator, req/s ratios understate differences (the generator's cost is common to all).", ""]
    elif cycles > 1:
        lines += [f"The targets were started, measured and stopped one after another in {cycles} cycles, in a "
                  "rotated order each cycle; a row is the target's cycle with the median req/s; each ratio (req/s, "
                  "tok/s, TTFT p50) is the median of that figure's ratios cycle by cycle, which the last columns "
                  "list for req/s and TTFT p50.", ""]
    elif rounds > 1:
        lines += [f"Every point was measured in {rounds} rounds, the targets interleaved within each round; a row is "
                  "the target's round with the median req/s; each ratio (req/s, tok/s, TTFT p50) is the median of "
                  "that figure's ratios round by round, which the last columns list for req/s and TTFT p50.", ""]
    if sc["load"]["mode"] == "closed":
        ramp = sc["load"].get("ramp_s") or 0
        lines += [("The streams' first requests were spread over " f"{ramp:g} s" if ramp else
                   "All streams sent their first request at once") + "; each ran straight on from its warm-up into "
                  "the measured window. Throughput counts the tokens and completions that arrived in the window; "
                  "latencies are those of the requests started in it. `start burst p50`: the median request's "
                  "burst, the requests that started within 5 ms of each other (1: spread; the level: in step).", ""]
    for name, why in run.get("skipped", {}).items():
        lines.append(f"- **{name} skipped**: {why}")
    unit = "c" if sc["load"]["mode"] == "closed" else "req/s"
    if sc["load"].get("client") == "vllm":
        lines += ["Measured by **vLLM's own benchmark client** (`vllm.benchmarks.serve`): every stream started "
                  "together, random prompts. `clumped`: the share of chunks that arrived within 0.5 ms of the one "
                  "before (tokens reaching the client in clumps); its comparison is in percentage points.", ""]
    for wl in sc["workloads"]:
        mine = [p for p in pts if p["workload"] == wl["name"]]
        if not mine:
            continue
        harness = any("clumped_share" in p for p in mine)
        lines += ["", f"## {wl['name']} ({wl['endpoint']}, {'streaming' if wl['stream'] else 'non-streaming'})", "",
                  f"| {unit} | target | req/s | out tok/s | goodput req/s | TTFT p50/p99 ms | ITL p50 ms | "
                  "TPOT p50 ms | E2E p50/p90/p99 ms | start burst p50 | errors | target CPU% | other CPU% |"
                  + (" req/CPU-s |" if together else "")
                  + (" ITL p99 ms | clumped | front-end CPU-s per 1k tok |" if harness else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if together else "")
                  + ("---|---|---|" if harness else "")]
        for p in mine:
            errs = ", ".join(f"{k}: {v}" for k, v in p["errors"].items()) or "0"
            lines.append(
                f"| {p['level']:g} | {p['target']} | {p['req_per_s']:.1f} | {p['output_tok_per_s']:.1f} | "
                f"{p['goodput_req_per_s']:.1f} | {_ms(p['ttft_s']['p50'])}/{_ms(p['ttft_s']['p99'])} | "
                f"{_ms(p['itl_s']['p50'])} | {_ms(p['tpot_s']['p50'])} | "
                f"{_ms(p['e2e_s']['p50'])}/{_ms(p['e2e_s']['p90'])}/{_ms(p['e2e_s']['p99'])} | "
                f"{_num((p.get('start_burst') or {}).get('p50'))} | {errs} | "
                f"{p.get('target_cpu_pct', '-')} | {p.get('other_cpu_pct', '-')} |"
                + (f" {_num(p.get('req_per_cpu_s'))} |" if together else "")
                + (f" {_ms(p['itl_s']['p99'])} | {_pct(p.get('clumped_share'))} |"
                   f" {_num(p.get('frontend_cpu_s_per_1k_tokens'), '.3f')} |" if harness else ""))
        base = sc.get("baseline")
        if base:
            lines += ["", f"Against **{base}** (same run, interleaved):", "",
                      f"| {unit} | target | req/s ratio | tok/s ratio | TTFT p50 ratio | E2E p50 added ms |"
                      + (" req/s ratio by round | TTFT p50 ratio by round |" if rounds > 1 else "")
                      + (" req/CPU-s ratio | req/CPU-s ratio by round |" if together else "")
                      + (" TTFT p99 ratio | ITL p99 ratio | clumped, points more | front-end CPU ratio |" if harness else ""),
                      "|---|---|---|---|---|---|" + ("---|---|" if rounds > 1 else "") + ("---|---|" if together else "")
                      + ("---|---|---|---|" if harness else "")]
            for p in mine:
                b = _find(pts, base, p["workload"], p["level"])
                if p["target"] == base or b is None:
                    continue
                de = (p["e2e_s"]["p50"] - b["e2e_s"]["p50"]) * 1000 if p["e2e_s"]["p50"] and b["e2e_s"]["p50"] else None
                lines.append(f"| {p['level']:g} | {p['target']} | {_num(paired_ratio(p, b), '.2f')} | "
                             f"{_num(paired_ratio(p, b, 'output_tok_per_s'), '.2f')} | "
                             f"{_num(paired_ratio(p, b, 'ttft_p50_ms'), '.2f')} | {_num(de, '+.3f')} |"
                             + (f" {_by_round(p, b)} | {_by_round(p, b, 'ttft_p50_ms')} |" if rounds > 1 else "")
                             + (f" {_num(paired_ratio(p, b, 'req_per_cpu_s'), '.2f')} |"
                                f" {_by_round(p, b, 'req_per_cpu_s')} |" if together else "")
                             + (f" {_num(paired_ratio(p, b, 'ttft_p99_ms'), '.2f')} |"
                                f" {_num(paired_ratio(p, b, 'itl_p99_ms'), '.2f')} |"
                                f" {_num(_points(paired_delta(p, b, 'clumped_share')), '+.1f')} |"
                                f" {_num(paired_ratio(p, b, 'frontend_cpu_s_per_1k_tokens'), '.2f')} |" if harness else ""))
        if harness:
            lines += _frontend_table(mine)
    if run.get("goals"):
        lines += ["", "## Goals", "", "| goal | workload | level | figure | bound | met |", "|---|---|---|---|---|---|"]
        for g in run["goals"]:
            lines.append(f"| {g['goal']} | {g['workload']} | {g['level']:g} | {_num(g['figure'], '.3f')} | "
                         f"{g['bound']} | {'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def plots(run: dict[str, Any], out_dir: Path) -> list[Path]:
    """Latency vs load and throughput vs load, one pair of PNGs per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = run["scenario"]
    xlabel = "concurrency" if sc["load"]["mode"] == "closed" else "offered load (req/s)"
    written = []
    for wl in sc["workloads"]:
        mine = [p for p in run["points"] if p["workload"] == wl["name"]]
        if not mine:
            continue
        targets = list(dict.fromkeys(p["target"] for p in mine))
        levels = sorted({p["level"] for p in mine})
        wide = levels[0] > 0 and levels[-1] / levels[0] >= 8
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, t in enumerate(targets):
            c = f"C{i}"
            ps = sorted((p for p in mine if p["target"] == t), key=lambda p: p["level"])
            xs = [p["level"] for p in ps]
            axes[0].plot(xs, [(p["e2e_s"]["p50"] or 0) * 1000 for p in ps], c=c, marker="o", label=f"{t} E2E p50")
            axes[0].plot(xs, [(p["e2e_s"]["p99"] or 0) * 1000 for p in ps], c=c, ls=":", marker=".",
                         label=f"{t} E2E p99")
            if wl["stream"]:
                axes[1].plot(xs, [(p["ttft_s"]["p50"] or 0) * 1000 for p in ps], c=c, marker="o",
                             label=f"{t} TTFT p50")
                axes[1].plot(xs, [(p["itl_s"]["p50"] or 0) * 1000 for p in ps], c=c, ls="--", marker="s",
                             label=f"{t} ITL p50")
        axes[0].set(title=f"{wl['name']}: end-to-end latency", xlabel=xlabel, ylabel="ms")
        axes[1].set(title=f"{wl['name']}: TTFT / ITL" if wl["stream"] else "(non-streaming: no TTFT)", xlabel=xlabel,
                    ylabel="ms")
        written.append(_save(fig, axes, wide, out_dir / f"{wl['name']}-latency.png"))

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for t in targets:
            ps = sorted((p for p in mine if p["target"] == t), key=lambda p: p["level"])
            xs = [p["level"] for p in ps]
            axes[0].plot(xs, [p["req_per_s"] for p in ps], marker="o", label=t)
            axes[1].plot(xs, [p["output_tok_per_s"] for p in ps], marker="o", label=t)
        axes[0].set(title=f"{wl['name']}: requests/s", xlabel=xlabel, ylabel="req/s")
        axes[1].set(title=f"{wl['name']}: output tokens/s", xlabel=xlabel, ylabel="tok/s")
        written.append(_save(fig, axes, wide, out_dir / f"{wl['name']}-throughput.png"))
    return written


def _save(fig: Any, axes: Any, log_x: bool, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log", base=2)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(run: dict[str, Any], out_dir: Path, with_plots: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(run, indent=1))
    paths["md"].write_text(markdown(run))
    if with_plots:
        for i, p in enumerate(plots(run, out_dir)):
            paths[f"png{i}"] = p
    return paths
