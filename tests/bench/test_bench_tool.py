"""`raygate bench` end to end against the fake engine: a short scenario, an open-loop sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from benchmarks.runner import free_port, stop, wait_ready

REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raygate.cli", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _check_reports(out: Path, workloads: list[str]) -> dict:
    run = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    for wl in workloads:
        assert f"## {wl} " in md
        for kind in ("latency", "throughput"):
            img = matplotlib.image.imread(out / f"{wl}-{kind}.png")  # parses as a PNG
            assert img.shape[0] > 100 and img.shape[1] > 100
    return run


def test_smoke_scenario_writes_reports_that_parse(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = _bench("run", "benchmarks/scenarios/smoke.yaml", "--out", str(out), "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = _check_reports(out, ["stream", "json"])
    points = run["points"]
    assert {(p["target"], p["workload"], p["level"]) for p in points} == {
        (t, w, lvl) for t in ("fake-direct", "fake-slow") for w in ("stream", "json") for lvl in (1.0, 4.0)}
    for p in points:
        assert p["completed"] > 0 and p["errors"] == {}
        assert p["req_per_s"] > 0 and p["e2e_s"]["p50"] > 0
        if p["workload"] == "stream":
            assert p["ttft_s"]["p50"] is not None and p["itl_s"]["p50"] is not None
            # Every stream carried 8 tokens; the window counts tokens and completions as they arrived, so requests
            # cut by its edges move the ratio by at most (level * 8) / completions.
            assert p["output_tok_per_s"] / p["req_per_s"] == pytest.approx(8, abs=p["level"] * 8 / p["completed"])
    slow = [p for p in points if p["target"] == "fake-slow" and p["workload"] == "stream"]
    assert all(p["slo_attainment"] == 0 for p in slow)  # TTFT 20 ms > the 10 ms SLO: no goodput
    assert all(p["ttft_s"]["p50"] >= 0.02 for p in slow)
    assert run["goals"] and all(g["met"] for g in run["goals"])
    assert "Against **fake-direct**" in (out / "results.md").read_text()


def test_closed_loop_streams_in_step_unless_ramped(tmp_path: Path) -> None:
    """8 fixed-length streams started at once finish together and start again together; a ramp spreads them."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "serve.fake_server", "--port", str(port), "--model", "m",
                               "--ttft-ms", "20", "--itl-ms", "20"], cwd=REPO, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", 30, server, None)
        points = {}
        for name, extra in (("together", ["--warmup", "0"]), ("ramped", ["--warmup", "0.5", "--ramp", "0.12"])):
            proc = _bench("url", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--concurrency", "8",
                          "--duration", "1.5", "--output-tokens", "8", "--exact-output", "--no-plots",
                          "--out", str(tmp_path / name), *extra)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            (points[name],) = json.loads((tmp_path / name / "results.json").read_text())["points"]
        # All 8 first requests leave in one burst, whatever happens later.
        assert points["together"]["start_burst"]["p99"] == 8
        # A request takes about 170 ms and worker i starts 15 ms after worker i-1: they start apart (mostly; the
        # phases drift by a few ms a request, so now and then two meet), never all 8 at once.
        assert points["ramped"]["start_burst"]["mean"] <= 2 and points["ramped"]["start_burst"]["p99"] < 8
        for p in points.values():
            assert p["errors"] == {} and p["completed"] > 8
            assert p["output_tok_per_s"] / p["req_per_s"] == pytest.approx(8, abs=8 * 8 / p["completed"])
    finally:
        stop(server, 10)


def test_open_loop_url_and_summary(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "serve.fake_server", "--port", str(port), "--model", "m"],
                              cwd=REPO, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", 30, server, None)
        out = tmp_path / "open"
        proc = _bench("url", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--rate", "40", "200",
                      "--duration", "2", "--output-tokens", "4:12", "--slo", "ttft=1", "--out", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = _check_reports(out, ["stream"])
        by_rate = {p["level"]: p for p in run["points"]}
        # Poisson arrivals over 2 s: about rate x 2 requests (wide bounds: 6 standard deviations).
        assert 40 <= by_rate[40.0]["requests"] <= 125
        assert 300 <= by_rate[200.0]["requests"] <= 500
        assert by_rate[200.0]["goodput_req_per_s"] > 0
        tokens = by_rate[200.0]["output_tok_per_s"] / by_rate[200.0]["req_per_s"]
        assert 4 <= tokens <= 12  # uniform output lengths
        summary = _bench("summary", str(out))
        assert summary.returncode == 0 and summary.stdout.startswith("| scenario |")
    finally:
        stop(server, 10)


def test_bad_scenario_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntargets: [{name: a, model: m}]\nbaseline: nope\nload: {levels: [1]}\n")
    proc = _bench("run", str(bad))
    assert proc.returncode != 0 and "unknown target" in proc.stderr


def test_together_mode_measures_each_target_s_own_cpu(tmp_path: Path) -> None:
    """Targets loaded at the same time; each gets its own CPU share, so the heavier server shows fewer req/CPU-s."""
    scenario = tmp_path / "together.yaml"
    scenario.write_text("""
name: together
targets:
  - name: fake-direct
    model: fake
    start: ["{python}", "-m", "serve.fake_server", "--port", "{port}", "--model", "fake"]
  - name: gateway
    model: fake
    key: "{key}"
    start: ["{python}", "-m", "raygate.cli", "gateway", "--config", "{workdir}/gw.yaml", "--port", "{port}"]
    files:
      gw.yaml: |
        gateway:
          settings:
            home: {workdir}/home
            api_keys: ["{key}"]
        serve:
          models:
            - model: fake
              engine: fake
baseline: fake-direct
workloads: [{name: json, stream: false, output_tokens: 4}]
load: {mode: closed, levels: [4], duration_s: 1.5, warmup_s: 0.2, rounds: 2, together: true}
goals:
  - {name: cost, target: gateway, vs: fake-direct, metric: req_per_cpu_s, compare: ratio, max: 1.0}
""")
    out = tmp_path / "out"
    proc = _bench("run", str(scenario), "--out", str(out), "--no-plots")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads((out / "results.json").read_text())
    by = {p["target"]: p for p in run["points"]}
    for p in by.values():
        assert p["together"] and p["errors"] == {} and len(p["rounds_req_per_cpu_s"]) == 2
        assert 0 < p["target_cpu_pct"] < 200 and p["req_per_cpu_s"] > 0
    # raygate's gateway does more per request (auth, validation, quota, metrics) than the bare fake server.
    assert by["gateway"]["req_per_cpu_s"] < by["fake-direct"]["req_per_cpu_s"]
    (goal,) = run["goals"]
    assert goal["met"] and 0 < goal["figure"] < 1
    md = (out / "results.md").read_text()
    assert "all targets ran at the same time" in md and "req/CPU-s ratio by round" in md
