"""vLLM's benchmark client as a measuring client: its command line and its detailed result as a point."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from benchmarks.report import check_goals
from benchmarks.scenario import Goal, Scenario
from benchmarks.vllm_client import client_argv, point_from_result
from benchmarks.workload import Workload


def _workload(**kw: object) -> Workload:
    return Workload.model_validate({"endpoint": "chat", "prompt_tokens": 64, "output_tokens": 128,
                                    "exact_output": True, **kw})


def test_the_command_line_is_the_issue_s_yardstick(tmp_path: Path) -> None:
    argv = client_argv("/py", "http://127.0.0.1:8000/v1", "m", "/tok", _workload(), 64, tmp_path, 0)
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert argv[:2] == ["/py", "-c"] and "vllm.benchmarks.serve" in argv[2]
    assert flags["--backend"] == "openai-chat" and flags["--endpoint"] == "/v1/chat/completions"
    assert flags["--base-url"] == "http://127.0.0.1:8000" and flags["--dataset-name"] == "random"
    assert (flags["--random-input-len"], flags["--random-output-len"]) == ("64", "128")
    assert (flags["--max-concurrency"], flags["--num-prompts"], flags["--num-warmups"]) == ("64", "512", "64")
    assert "--ignore-eos" in argv and argv[argv.index("--tokenizer") + 1] == "/tok"
    completion = client_argv("/py", "http://h:1/v1", "m", None, _workload(endpoint="completion", exact_output=False),
                             1, tmp_path, 0)
    assert completion[completion.index("--backend") + 1] == "openai" and "--ignore-eos" not in completion
    assert completion[completion.index("--endpoint") + 1] == "/v1/completions" and "--tokenizer" not in completion


def test_a_detailed_result_becomes_a_point_with_the_clumped_share() -> None:
    doc = {
        "duration": 2.0, "completed": 2, "failed": 1, "request_throughput": 1.0, "output_throughput": 4.0,
        "errors": ["", "", "Traceback ...\nClientConnectorError: refused"],
        "ttfts": [0.010, 0.020, 0.0], "latencies": [0.040, 0.050, 0.0], "output_lens": [4, 4, 0],
        # 6 gaps of the two good requests; two arrived within 0.5 ms of the chunk before
        "itls": [[0.010, 0.0001, 0.020], [0.0002, 0.010, 0.020], []],
    }
    p = point_from_result(doc)
    assert (p["requests"], p["completed"], p["errors"]) == (3, 2, {"ClientConnectorError: refused": 1})
    assert p["clumped_share"] == pytest.approx(2 / 6)
    assert p["ttft_s"]["p50"] == pytest.approx(0.015) and p["output_tok_per_s"] == 4.0
    assert p["tpot_s"]["p50"] == pytest.approx(0.01)  # (e2e - ttft) / (tokens - 1)
    assert p["itl_s"]["p99"] == pytest.approx(0.02, rel=0.01)


def test_clumped_share_goal_is_a_paired_delta_and_p99_ratios_pair_by_cycle() -> None:
    ours = {"target": "raygate", "workload": "w", "level": 64, "clumped_share": 0.3, "itl_s": {"p99": 0.03},
            "rounds_clumped_share": [0.30, 0.10, 0.40], "rounds_itl_p99_ms": [30.0, 20.0, 40.0]}
    theirs = {"target": "vllm", "workload": "w", "level": 64, "clumped_share": 0.0, "itl_s": {"p99": 0.02},
              "rounds_clumped_share": [0.0, 0.0, 0.01], "rounds_itl_p99_ms": [20.0, 20.0, 20.0]}
    goals = [Goal(name="clumped", target="raygate", vs="vllm", metric="clumped_share", compare="delta", max=0.05),
             Goal(name="itl", target="raygate", vs="vllm", metric="itl_p99_ms", compare="ratio", max=1.5)]
    clumped, itl = check_goals(goals, [ours, theirs])
    assert clumped["figure"] == pytest.approx(0.30) and not clumped["met"]  # vLLM's 0 share is a reference too
    assert itl["figure"] == pytest.approx(1.5) and itl["met"]


def test_the_vllm_client_needs_fixed_lengths_and_a_closed_loop() -> None:
    base = {"name": "s", "targets": [{"name": "a", "model": "m"}], "load": {"levels": [1], "client": "vllm"},
            "workloads": [{"prompt_tokens": 64, "output_tokens": 128}]}
    Scenario.model_validate(base)
    for bad in ({"workloads": [{"prompt_tokens": {"min": 8, "max": 64}}]},
                {"load": {"levels": [1], "client": "vllm", "mode": "open"}},
                {"load": {"levels": [1], "client": "vllm", "together": True}}):
        with pytest.raises(ValidationError, match="client vllm"):
            Scenario.model_validate({**base, **bad})


def test_front_end_cpu_per_token_leaves_out_only_vllm_s_engine_processes() -> None:
    from benchmarks.vllm_client import cpu_per_1k_tokens

    raygate = {"ray::ServeReplica:raygate:gateway": 6.0, "haproxy": 1.1, "gcs_server": 0.5,
               "VLLM::EngineCore": 20.0, "VLLM::Worker_TP0": 11.9}
    figures = cpu_per_1k_tokens(raygate, 50_000)
    assert figures["frontend_cpu_s_per_1k_tokens"] == pytest.approx(0.152)
    assert figures["engine_cpu_s_per_1k_tokens"] == pytest.approx(0.638)
    assert cpu_per_1k_tokens(raygate, 0)["frontend_cpu_s_per_1k_tokens"] is None



def test_front_end_cpu_by_role_names_ray_s_processes_and_leaves_out_the_engine() -> None:
    from benchmarks.vllm_client import frontend_by_role

    by_process = {"ray::ServeReplica:raygate:gateway": 7.9, "ray::ServeReplica:raygate:model": 0.1,
                  "log_monitor.py": 0.27, "monitor.py": 0.02, "ray-dashboard-NodeHead-0": 0.07,
                  "ray-dashboard-JobHead-0": 0.04, "gcs_server": 0.26, "VLLM::EngineCore": 28.0,
                  "VLLM::Worker": 32.5, "some-helper": 0.05}
    roles = frontend_by_role(by_process)
    assert list(roles)[0] == "Serve replicas (the gateway, models)"
    assert roles["Serve replicas (the gateway, models)"] == pytest.approx(8.0)
    assert roles["Ray's log monitor"] == 0.27 and roles["Ray's autoscaler monitor"] == 0.02
    assert roles["Ray's dashboard modules"] == pytest.approx(0.11) and roles["Ray's GCS"] == 0.26
    assert roles["some-helper"] == 0.05  # a process no role names keeps its own title
    assert not any("VLLM" in role for role in roles) and sum(roles.values()) == pytest.approx(8.71)


def test_the_harness_report_shares_each_target_s_front_end_figure_out_by_process() -> None:
    from benchmarks.report import markdown

    def point(target: str, level: int, figure: float, by_process: dict[str, float]) -> dict:
        dist = {"p50": 0.01, "p90": 0.01, "p99": 0.01}
        return {"target": target, "workload": "w", "level": level, "req_per_s": 1.0, "output_tok_per_s": 100.0,
                "goodput_req_per_s": 1.0, "ttft_s": dist, "itl_s": dist, "tpot_s": dist, "e2e_s": dist,
                "errors": {}, "clumped_share": 0.0, "frontend_cpu_s_per_1k_tokens": figure,
                "target_cpu_s_by_process": by_process}

    run = {"scenario": {"name": "h", "load": {"mode": "closed", "duration_s": 1, "client": "vllm"},
                        "workloads": [{"name": "w", "endpoint": "chat", "stream": True}], "baseline": "vllm",
                        "slo": None},
           "wall_s": 1.0, "machine": {"cpus": 2},
           "points": [point("raygate", 1, 0.9, {"raygate": 1.0}),
                      point("raygate", 64, 0.15, {"ray::ServeReplica:raygate:gateway": 8.0, "gcs_server": 2.0,
                                                  "VLLM::Worker": 30.0}),
                      point("vllm", 64, 0.1, {"vllm.entrypoints.openai.api_server": 7.0, "VLLM::Worker": 31.0})]}
    md = markdown(run)
    table = md[md.index("by process at 64"):]
    assert "| process | raygate | vllm |" in table
    assert "| Serve replicas (the gateway, models) | 0.1200 | - |" in table  # 8 of the 10 front-end CPU-s
    assert "| Ray's GCS | 0.0300 | - |" in table and "| vLLM's API server | - | 0.1000 |" in table
    assert "| **all** | 0.1500 | 0.1000 |" in table and "raygate up" not in table  # only the highest level


FAKE_SERVE = '''
import json, os, time
def add_cli_args(parser):
    for flag in ("--backend", "--base-url", "--endpoint", "--model", "--dataset-name", "--random-input-len",
                 "--random-output-len", "--max-concurrency", "--num-prompts", "--num-warmups", "--seed",
                 "--percentile-metrics", "--metric-percentiles", "--result-dir", "--result-filename", "--tokenizer"):
        parser.add_argument(flag)
    parser.add_argument("--save-result", action="store_true")
    parser.add_argument("--save-detailed", action="store_true")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--ignore-eos", action="store_true")
def main(args):
    with open(os.path.join(args.result_dir, args.result_filename), "w") as f:
        json.dump({"duration": 1.0, "completed": 1, "failed": 0, "request_throughput": 1.0, "output_throughput": 2.0,
                   "errors": [""], "ttfts": [0.01], "latencies": [0.02], "output_lens": [2], "itls": [[0.01]],
                   "total_output_tokens": 2, "sent_at": time.time()}, f)
'''


def _fake_vllm(root: Path, serve_source: str) -> None:
    (root / "vllm" / "benchmarks").mkdir(parents=True)
    (root / "vllm" / "utils").mkdir()
    for pkg in ("vllm", "vllm/benchmarks", "vllm/utils"):
        (root / pkg / "__init__.py").write_text("")
    (root / "vllm" / "utils" / "argparse_utils.py").write_text("from argparse import ArgumentParser as FlexibleArgumentParser\n")
    (root / "vllm" / "benchmarks" / "serve.py").write_text(serve_source)


def test_the_client_loads_before_the_window_and_sends_only_when_told(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys
    import time

    from benchmarks.vllm_client import LoadedClient

    _fake_vllm(tmp_path / "lib", "print('a library talking on import')\n" + FAKE_SERVE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "lib"))
    out = tmp_path / "point"
    with LoadedClient(sys.executable, "http://127.0.0.1:9/v1", "k", "m", None, _workload(), 1, out, 0, 30) as client:
        time.sleep(0.3)  # a client that did not wait would have written its result by now
        assert not (out / "result.json").exists()
        told = time.time()
        point = client.run()
    assert json.loads((out / "result.json").read_text())["sent_at"] >= told
    assert point["completed"] == 1 and point["output_tokens"] == 2
    assert "a library talking on import" in (out / "client.log").read_text()


def test_a_client_that_cannot_load_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from benchmarks.vllm_client import LoadedClient

    _fake_vllm(tmp_path / "lib", "raise ImportError('no vLLM build for this CPU')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "lib"))
    with pytest.raises(RuntimeError, match="did not load(?s:.*)no vLLM build for this CPU"), \
            LoadedClient(sys.executable, "http://127.0.0.1:9/v1", "k", "m", None, _workload(), 1, tmp_path / "p", 0, 30):
        pass
