"""The benchmark tool's statistics, workloads and goal checks, against synthetic timings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.report import check_goals, markdown
from benchmarks.scenario import Goal, Placeholders, Scenario
from benchmarks.stats import SLO, RequestRecord, in_window, median_round, percentile, start_bursts, summarize
from benchmarks.workload import Length, Workload


def test_percentile_interpolates() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 90) == pytest.approx(90.1)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 100.0
    assert percentile([], 50) is None


def test_summarize_latencies_tokens_and_errors() -> None:
    # 4 streams: TTFT 0.1..0.4 s, 11 tokens each, end-to-end 1.1 s, chunk gaps 10 and 30 ms.
    recs = [RequestRecord(ok=True, ttft_s=0.1 * (i + 1), e2e_s=1.1, output_tokens=11, itl_s=[0.01, 0.03])
            for i in range(4)]
    recs += [RequestRecord(ok=False, error="http_503"), RequestRecord(ok=False, error="http_503"),
             RequestRecord(ok=False, error="timeout")]
    s = summarize(recs, wall_s=2.0)
    assert (s["requests"], s["completed"]) == (7, 4)
    assert s["errors"] == {"http_503": 2, "timeout": 1}
    assert s["error_rate"] == pytest.approx(3 / 7)
    assert s["req_per_s"] == pytest.approx(2.0) and s["output_tok_per_s"] == pytest.approx(22.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.25) and s["ttft_s"]["mean"] == pytest.approx(0.25)
    assert s["itl_s"]["mean"] == pytest.approx(0.02) and s["itl_s"]["p50"] == pytest.approx(0.02)
    # TPOT = (e2e - ttft) / (tokens - 1): (1.1 - 0.1) / 10 = 0.1 ... (1.1 - 0.4) / 10 = 0.07
    assert s["tpot_s"]["p50"] == pytest.approx((0.09 + 0.08) / 2)
    assert s["e2e_s"]["p99"] == pytest.approx(1.1)
    # No SLO: every completed request is good.
    assert s["goodput_req_per_s"] == pytest.approx(2.0)


def test_start_bursts_group_requests_started_within_the_gap() -> None:
    starts = [0.0, 0.001, 0.004, 0.5, 0.503, 1.0]  # a burst of 3 (chained 1 + 3 ms apart), one of 2, one alone
    recs = [RequestRecord(ok=True, start_s=s) for s in reversed(starts)]
    assert sorted(start_bursts(recs)) == [1, 2, 2, 3, 3, 3]
    assert start_bursts([]) == []
    assert summarize(recs, wall_s=1.0)["start_burst"]["p50"] == 2.5


def test_in_window_counts_tokens_and_completions_as_they_arrived() -> None:
    # A stream from 0.5 s: first token at 1.0 s, then 3 more 0.5 s apart (1.5, 2.0, 2.5), 8 tokens over 4 events.
    stream = RequestRecord(ok=True, start_s=0.5, ttft_s=0.5, e2e_s=2.0, output_tokens=8, itl_s=[0.5, 0.5, 0.5])
    full = RequestRecord(ok=True, start_s=0.0, e2e_s=1.2, output_tokens=5)  # all 5 tokens at 1.2 s
    failed = RequestRecord(ok=False, error="http_503", start_s=0.0)
    assert in_window([stream, full, failed], 1.2, 2.2) == (pytest.approx(4 + 5), 1)  # 1.5 and 2.0; full ends 1.2
    assert in_window([stream, full], 0.0, 1.2) == (pytest.approx(2), 0)  # only the first event; ends are in [lo, hi)
    assert in_window([stream, full], 2.2, 3.0) == (pytest.approx(2), 1)  # the last event and the stream's end
    s = summarize([stream], wall_s=2.0, window=(10.0, 3))
    assert s["output_tok_per_s"] == 5.0 and s["req_per_s"] == 1.5 and s["completed"] == 1


def test_goodput_counts_requests_within_every_bound() -> None:
    recs = [
        RequestRecord(ok=True, ttft_s=0.2, e2e_s=1.2, output_tokens=21),   # tpot 0.05: meets both
        RequestRecord(ok=True, ttft_s=0.8, e2e_s=1.8, output_tokens=21),   # TTFT too slow
        RequestRecord(ok=True, ttft_s=0.2, e2e_s=4.2, output_tokens=21),   # tpot 0.2: too slow
        RequestRecord(ok=True, ttft_s=0.1, e2e_s=0.1, output_tokens=1),    # one token: tpot undefined, ok
        RequestRecord(ok=False, error="http_429"),
    ]
    slo = SLO.parse("ttft=0.5,tpot=0.1")
    s = summarize(recs, wall_s=1.0, slo=slo)
    assert s["goodput_req_per_s"] == pytest.approx(2.0)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["slo"] == "ttft=0.5,tpot=0.1"


@pytest.mark.parametrize("bad", ["ttft", "ttft=0", "latency=1", "ttft=x"])
def test_slo_parse_rejects_bad_terms(bad: str) -> None:
    with pytest.raises(ValueError):
        SLO.parse(bad)


def test_workload_is_reproducible_and_shaped() -> None:
    wl = Workload(stream=True, prompt_tokens=Length(min=4, max=8), output_tokens=Length(fixed=5), exact_output=True,
                  seed=7)
    a = [next(b) for b in [wl.bodies("m")] for _ in range(20)]
    b_iter = wl.bodies("m")
    b = [next(b_iter) for _ in range(20)]
    assert a == b  # same seed, same sequence: every target gets the same requests
    for body in a:
        assert 4 <= len(body["messages"][0]["content"].split()) <= 8
        assert body["max_tokens"] == body["min_tokens"] == 5 and body["ignore_eos"] is True
        assert body["stream_options"] == {"include_usage": True}
    completion = next(Workload(endpoint="completion", stream=False, prompt_tokens=3).bodies("m"))
    assert isinstance(completion["prompt"], str) and "stream" not in completion


def test_workload_dataset(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) + "\n\n"
                    + json.dumps({"prompt": "once upon"}) + "\n")
    bodies = Workload(dataset=path, output_tokens=9).bodies("m")
    first, second, third = next(bodies), next(bodies), next(bodies)
    assert first["messages"][0]["content"] == "hi" and first["max_tokens"] == 3
    assert second["messages"][0]["content"] == "once upon" and second["max_tokens"] == 9
    assert third["max_tokens"] == 3
    path.write_text('{"max_tokens": 3}\n')
    with pytest.raises(ValueError, match="messages"):
        next(Workload(dataset=path).bodies("m"))


def test_length_needs_one_form() -> None:
    assert Length.model_validate(5).draw(random.Random(0)) == 5
    with pytest.raises(ValueError):
        Length(min=5)
    with pytest.raises(ValueError):
        Length(min=9, max=2)


def _point(target: str, level: float, rps: float, e2e: float) -> dict:
    s = summarize([RequestRecord(ok=True, e2e_s=e2e, output_tokens=4)], wall_s=1.0)
    s.update({"target": target, "workload": "w", "level": level, "stream": False, "req_per_s": rps})
    return s


def test_goals_ratio_and_delta() -> None:
    points = [_point("base", 1, 100.0, 0.0010), _point("gw", 1, 90.0, 0.0017),
              _point("base", 16, 100.0, 0.010), _point("gw", 16, 1200.0, 0.012)]
    goals = [
        Goal(name="overhead", target="gw", vs="base", metric="e2e_p50_ms", compare="delta", levels=[1], max=1.0),
        Goal(name="10x", target="gw", vs="base", metric="req_per_s", compare="ratio", levels=[16], min=10),
        Goal(name="abs", target="gw", metric="req_per_s", compare="value", min=100),
    ]
    out = check_goals(goals, points)
    assert [(g["goal"], g["level"], round(g["figure"], 3), g["met"]) for g in out] == [
        ("overhead", 1, 0.7, True), ("10x", 16, 12.0, True), ("abs", 1, 90.0, False), ("abs", 16, 1200.0, True),
    ]


def test_scenario_validation_and_placeholders(tmp_path) -> None:  # noqa: ANN001
    base = {"name": "s", "targets": [{"name": "a", "model": "m"}], "load": {"levels": [1]}}
    Scenario.model_validate(base)
    with pytest.raises(ValueError, match="unknown target"):
        Scenario.model_validate({**base, "baseline": "nope"})
    with pytest.raises(ValueError, match="unique"):
        Scenario.model_validate({**base, "targets": [{"name": "a", "model": "m"}] * 2})
    ph = Placeholders.create("/usr/bin/python3", tmp_path, tmp_path, {"a": 1234, "up": 99}, "k")
    assert ph.expand("http://127.0.0.1:{port}/v1 {ports[up]} {key} {bin}", "a") == "http://127.0.0.1:1234/v1 99 k /usr/bin"


def test_markdown_has_ratio_table() -> None:
    sc = Scenario.model_validate({"name": "s", "baseline": "base", "targets": [
        {"name": "base", "model": "m"}, {"name": "gw", "model": "m"}], "workloads": [{"name": "w", "stream": False}],
        "load": {"levels": [1]}})
    run = {"scenario": sc.model_dump(mode="json"), "wall_s": 1.0, "machine": {"cpus": 2},
           "points": [_point("base", 1, 100.0, 0.001), _point("gw", 1, 50.0, 0.003)], "goals": []}
    md = markdown(run)
    assert "| 1 | gw | 0.50 |" in md and "+2.000" in md


def test_process_titles() -> None:
    from benchmarks.procs import title

    assert title(["ray::ServeReplica:raygate:gateway"], "ray::ServeReplica") == "ray::ServeReplica:raygate:gateway"
    assert title(["/v/bin/python3.11", "-u", "/x/ray/dashboard/dashboard.py", "--host=1"], "python") == "dashboard.py"
    assert title(["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], "python") == \
        "vllm.entrypoints.openai.api_server"
    assert title(["/usr/lib/ray/raylet", "--x"], "raylet") == "raylet"
    assert title([], "kworker") == "kworker"


def test_median_round_keeps_a_whole_round() -> None:
    rounds = [_point("gw", 1, rps, e2e) for rps, e2e in ((90.0, 0.3), (120.0, 0.1), (100.0, 0.2), (95.0, 0.25))]
    kept = median_round(rounds)
    # Even count: the lower middle round (95 req/s), with its own latency, and every round's req/s in run order.
    assert kept["req_per_s"] == 95.0 and kept["e2e_s"]["p50"] == pytest.approx(0.25)
    assert kept["rounds_req_per_s"] == [90.0, 120.0, 100.0, 95.0]
    assert median_round(rounds[:3])["req_per_s"] == 100.0


def test_rounds_interleave_targets_in_rotated_order(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from benchmarks.load import Point
    from benchmarks.runner import Runner, Running

    sc = Scenario.model_validate({"name": "s", "targets": [{"name": n, "model": "m"} for n in "abc"],
                                  "load": {"levels": [1], "rounds": 3}})
    runner = Runner(sc, tmp_path, workdir=tmp_path, quiet=True)
    order: list[str] = []
    speed = {"a": [10.0, 30.0, 20.0], "b": [5.0, 5.0, 6.0], "c": [1.0, 3.0, 2.0]}

    def measure(r: Running, wi: int, point: Point) -> dict:
        n = sum(1 for t in order if t == r.target.name)
        order.append(r.target.name)
        return _point(r.target.name, point.level, speed[r.target.name][n], 0.01)

    monkeypatch.setattr(runner, "measure", measure)
    running = [Running(t, "http://x/v1", None) for t in sc.targets]
    out = runner.measure_rounds(running, 0, runner.points()[0])
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [(p["target"], p["req_per_s"]) for p in out] == [("a", 20.0), ("b", 5.0), ("c", 2.0)]
    run = {"scenario": {**sc.model_dump(mode="json"), "baseline": "a", "workloads": [{"name": "w", "stream": False,
                                                                                      "endpoint": "chat"}]},
           "wall_s": 1.0, "machine": {"cpus": 2}, "points": out}
    md = markdown(run)
    assert "3 rounds" in md and "| 1 | c | 0.10 |" in md and "0.10 0.10 0.10 |" in md


def test_cycles_restart_sequential_targets_in_rotated_order(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Sequential targets: each cycle starts, measures and stops them all, in a rotated order; median cycle kept."""
    import contextlib

    from benchmarks.load import Point
    from benchmarks.runner import Runner, Running

    sc = Scenario.model_validate({"name": "s", "targets": [{"name": n, "model": "m"} for n in "ab"],
                                  "lifecycle": "sequential", "load": {"levels": [1, 2], "cycles": 3}})
    runner = Runner(sc, tmp_path, workdir=tmp_path, quiet=True)
    started: list[str] = []
    speed = {"a": [10.0, 30.0, 20.0], "b": [5.0, 4.0, 6.0]}

    @contextlib.contextmanager
    def up(group):  # noqa: ANN001, ANN202
        started.append(group[0].name)
        yield [Running(t, "http://x/v1", None) for t in group]

    def measure(r: Running, wi: int, point: Point) -> dict:
        return _point(r.target.name, point.level, speed[r.target.name][started.count(r.target.name) - 1], 0.01)

    monkeypatch.setattr(runner, "up", up)
    monkeypatch.setattr(runner, "measure", measure)
    out = runner.run()["points"]
    assert started == ["a", "b", "b", "a", "a", "b"]
    assert [(p["target"], p["level"], p["req_per_s"]) for p in out] == [("a", 1, 20.0), ("a", 2, 20.0),
                                                                        ("b", 1, 5.0), ("b", 2, 5.0)]
    assert out[0]["rounds_req_per_s"] == [10.0, 30.0, 20.0]
    (goal,) = check_goals([Goal(name="g", target="a", vs="b", metric="req_per_s", levels=[1])], out)
    assert goal["figure"] == pytest.approx(20 / 6)  # cycle ratios 2, 7.5, 3.33: their median, not 20/5
    with pytest.raises(ValueError, match="cycles"):
        Scenario.model_validate({"name": "s", "targets": [{"name": "a", "model": "m"}],
                                 "load": {"levels": [1], "cycles": 2}})


def test_goal_ratio_pairs_the_rounds() -> None:
    """Each round measured both back to back: the figure is the median of the round ratios, not of the medians."""
    base = median_round([_point("base", 1, r, 0.01) for r in (100.0, 50.0)])
    gw = median_round([_point("gw", 1, r, 0.01) for r in (90.0, 50.0)])
    (out,) = check_goals([Goal(name="g", target="gw", vs="base", metric="req_per_s", min=0.95)], [base, gw])
    assert out["figure"] == pytest.approx(0.95) and out["met"]
    assert base["req_per_s"] == gw["req_per_s"] == 50.0  # the medians alone would say 1.0


def test_cpu_cost_goal_pairs_the_rounds_too() -> None:
    """Together mode: rounds keep req per CPU-second; its goal is the median of the round ratios."""
    def rnd(target: str, rps: float, per_cpu: float) -> dict:
        return {**_point(target, 1, rps, 0.01), "req_per_cpu_s": per_cpu}

    base = median_round([rnd("base", 100.0, 2000.0), rnd("base", 100.0, 1000.0), rnd("base", 100.0, 1500.0)])
    gw = median_round([rnd("gw", 100.0, 1900.0), rnd("gw", 100.0, 900.0), rnd("gw", 100.0, 1500.0)])
    assert gw["rounds_req_per_cpu_s"] == [1900.0, 900.0, 1500.0]
    (out,) = check_goals([Goal(name="g", target="gw", vs="base", metric="req_per_cpu_s", min=0.95)], [base, gw])
    assert out["figure"] == pytest.approx(0.95) and out["met"]  # ratios 0.95, 0.90, 1.00: the median
    missing = median_round([_point("x", 1, 10.0, 0.01), rnd("x", 10.0, 5.0)])
    assert "rounds_req_per_cpu_s" not in missing  # only when every round measured it


def test_every_ratio_pairs_the_rounds_not_the_median_rows() -> None:
    """TTFT and tok/s ratios are medians of round ratios too: the median-req/s row may hold an outlier TTFT."""
    def rnd(target: str, rps: float, ttft: float) -> dict:
        s = summarize([RequestRecord(ok=True, ttft_s=ttft, e2e_s=ttft + 0.1, output_tokens=4)], wall_s=1.0)
        s.update({"target": target, "workload": "w", "level": 1, "stream": True, "req_per_s": rps,
                  "output_tok_per_s": rps * 4})
        return s

    base = median_round([rnd("base", 100.0, 0.05), rnd("base", 50.0, 0.05), rnd("base", 80.0, 1.0)])
    gw = median_round([rnd("gw", 90.0, 0.06), rnd("gw", 45.0, 0.06), rnd("gw", 85.0, 0.06)])
    assert base["ttft_s"]["p50"] == 1.0 and gw["ttft_s"]["p50"] == 0.06  # the rows alone would say 0.06x
    assert gw["rounds_ttft_p50_ms"] == pytest.approx([60.0, 60.0, 60.0])
    goals = [Goal(name="ttft", target="gw", vs="base", metric="ttft_p50_ms", max=1.2),
             Goal(name="tok", target="gw", vs="base", metric="output_tok_per_s", min=0.9)]
    ttft, tok = check_goals(goals, [base, gw])
    assert ttft["figure"] == pytest.approx(1.2) and ttft["met"]  # round ratios 1.2, 1.2, 0.06
    assert tok["figure"] == pytest.approx(0.9) and tok["met"]  # round ratios 0.9, 0.9, 1.0625
    report = markdown({"scenario": {"name": "s", "load": {"mode": "closed", "duration_s": 1, "rounds": 3},
                                    "baseline": "base", "slo": None,
                                    "workloads": [{"name": "w", "endpoint": "chat", "stream": True}]},
                       "machine": {"cpus": 2}, "wall_s": 1, "points": [base, gw]})
    assert "| 1 | gw | 0.90 | 0.90 | 1.20 |" in report and "1.20 1.20 0.06" in report


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_committed_scenario_expands_and_its_raygate_configs_load(path: Path, tmp_path) -> None:  # noqa: ANN001
    """Braces in a target's files are placeholders: a YAML flow mapping there breaks the run, not the load."""
    import yaml

    from gateway.config import AppConfig

    scenario = Scenario.load_file(path)
    values = Placeholders.create("/venv/bin/python", tmp_path, tmp_path, {t.name: 1 for t in scenario.targets}, "k")
    for target in scenario.targets:
        for arg in (target.start or []):
            values.expand(arg, target.name)
        for text in target.files.values():
            doc = yaml.safe_load(values.expand(text, target.name))
            if isinstance(doc, dict) and "serve" in doc:
                AppConfig.load(doc)
