"""Runs a scenario: start the targets, measure every point target after target, stop them, report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from benchmarks import vllm_client
from benchmarks.load import Point, Progress, run_point
from benchmarks.procs import Watch
from benchmarks.scenario import Placeholders, Scenario, Target
from benchmarks.stats import SLO, median_round

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    """A target as the run sees it: resolved URL and key, its process (if it started one)."""

    target: Target
    base_url: str
    key: str | None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    skipped: str | None = None
    pids: list[int] = field(default_factory=list)


def _origin(base_url: str) -> str:
    u = urlsplit(base_url)
    return f"{u.scheme}://{u.netloc}"


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:g} s")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 90.0) -> None:
    """SIGINT the target's process group (clean shutdown), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Runner:
    """One run of a scenario; results land under `out_dir`."""

    def __init__(self, scenario: Scenario, out_dir: Path, workdir: Path | None = None, quiet: bool = False,
                 progress: bool | None = None) -> None:
        self.sc = scenario
        self.out_dir = out_dir
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"rg-bench-{scenario.name}-"))
        self.quiet = quiet
        self.progress = progress
        self.ph = Placeholders.create(sys.executable, self.workdir, REPO,
                                      {t.name: free_port() for t in scenario.targets},
                                      "rg-bench-" + secrets.token_urlsafe(24))
        self.slo = SLO.parse(scenario.slo)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    # -- targets -------------------------------------------------------------------------------

    def launch(self, t: Target) -> Running:
        ex = lambda s: self.ph.expand(s, t.name)  # noqa: E731
        run = Running(t, ex(t.base_url), ex(t.key) if t.key else None)
        if t.requires and not (shutil.which(ex(t.requires)) or Path(ex(t.requires)).exists()):
            run.skipped = f"{ex(t.requires)} not installed"
            self.say(f"[{t.name}] skipped: {run.skipped}")
            return run
        for name, content in t.files.items():
            path = self.workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(ex(content))
        if t.start:
            run.log = self.workdir / f"{t.name}.log"
            self.say(f"[{t.name}] starting ...")
            # A process group of its own (stopped whole), in the load generator's session: Linux schedules each
            # session as one group (autogroup), so a target in a new session would compete with the load
            # generator as an equal group whatever its nice level. Measured: targets got 190% of two cores,
            # the client 5-9% instead of 13-20%, and its reads came in bursts (ITL p50 0.01 ms, TTFT p99 5-6 s).
            with open(run.log, "wb") as log:
                run.proc = subprocess.Popen(
                    [ex(a) for a in t.start], env={**os.environ, **{k: ex(v) for k, v in t.env.items()}},
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO, process_group=0,
                )
            run.pids = [run.proc.pid]
        started = time.monotonic()
        if t.ready_path is not None:
            try:
                wait_ready(_origin(run.base_url) + t.ready_path, t.ready_timeout_s, run.proc, run.log)
            except BaseException:  # never ready, or the run itself stopped (Ctrl-C, SIGTERM): not left running
                if run.proc is not None:
                    stop(run.proc)
                raise
        self.say(f"[{t.name}] ready at {run.base_url} ({time.monotonic() - started:.0f} s)")
        return run

    @contextlib.contextmanager
    def up(self, targets: list[Target]) -> Iterator[list[Running]]:
        running: list[Running] = []
        try:
            for t in targets:
                running.append(self.launch(t))
                self.warm(running[-1])
            yield running
        finally:
            for r in reversed(running):
                if r.proc is not None:
                    stop(r.proc)

    # -- measurement ---------------------------------------------------------------------------

    def points(self) -> list[Point]:
        ld = self.sc.load
        return [Point(ld.mode, lvl, ld.duration_s, ld.max_requests, ld.warmup_s, ld.max_inflight, ld.ramp_s)
                for lvl in ld.levels]

    def warm(self, r: Running) -> None:
        """Load a fresh target at the highest level for `target_warmup_s`, unmeasured."""
        ld = self.sc.load
        if ld.target_warmup_s <= 0 or r.skipped or not r.target.measure:
            return
        wl = self.sc.workloads[0]
        point = Point(ld.mode, max(ld.levels), ld.target_warmup_s, ld.max_requests, 0.0, ld.max_inflight, ld.ramp_s)
        res = asyncio.run(run_point(r.base_url, r.key, wl.bodies(r.target.model), wl.path(), point,
                                    timeout_s=ld.timeout_s))
        self.say(f"[{r.target.name}] warmed up: {res['completed']} requests in {ld.target_warmup_s:g} s")

    def measure(self, r: Running, workload_index: int, point: Point) -> dict[str, Any]:
        wl = self.sc.workloads[workload_index]
        ld = self.sc.load
        prog = Progress(f"{r.target.name} {wl.name} {point.label}", point.duration_s,
                        self.progress and ld.client == "raygate")
        if ld.client == "vllm":
            tokenizer = self.ph.expand(r.target.tokenizer, r.target.name) if r.target.tokenizer else None
            with vllm_client.LoadedClient(
                sys.executable, r.base_url, r.key, r.target.model, tokenizer, wl, int(point.level),
                self.workdir / "vllm-client" / f"{r.target.name}-{wl.name}-{point.level:g}",
                wl.seed, ld.timeout_s * vllm_client.REQUESTS_PER_STREAM,
            ) as client, Watch(r.pids) as watch:
                res = client.run()
            res.update({"mode": point.mode, "level": point.level, "duration_s": res["wall_s"]})
            res.update(watch.result)
            # The window holds the warm-up requests too: count their tokens as well.
            requests = vllm_client.REQUESTS_PER_STREAM * point.level
            tokens = res["output_tokens"] * (requests + point.level) / requests
            res.update(vllm_client.cpu_per_1k_tokens(watch.cpu_s_by_process, tokens))
        else:
            with Watch(r.pids) as watch:
                res = asyncio.run(run_point(r.base_url, r.key, wl.bodies(r.target.model), wl.path(), point, self.slo,
                                            prog, seed=wl.seed, timeout_s=ld.timeout_s))
            res.update(watch.result)
        res.update({"target": r.target.name, "workload": wl.name, "stream": wl.stream})
        if not prog.enabled:
            self.say(f"  {r.target.name:14s} {wl.name:14s} {point.label:12s} {res['req_per_s']:9.1f} req/s "
                     f"{res['output_tok_per_s']:9.1f} tok/s  e2e p50 {_ms(res['e2e_s']['p50'])} ms  "
                     f"errors {sum(res['errors'].values())}  cpu {res['target_cpu_pct']}%")
        return res

    def measure_together(self, measured: list[Running], workload_index: int, point: Point) -> list[dict[str, Any]]:
        """`point` on every target at once, each with its own clients; one result per target."""
        wl = self.sc.workloads[workload_index]

        async def one(r: Running) -> dict[str, Any]:
            return await run_point(r.base_url, r.key, wl.bodies(r.target.model), wl.path(), point, self.slo,
                                   None, seed=wl.seed, timeout_s=self.sc.load.timeout_s)

        async def all_of() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(one(r) for r in measured)))

        with contextlib.ExitStack() as stack:
            watches = [stack.enter_context(Watch(r.pids)) for r in measured]  # CPU of each target's own processes
            results = asyncio.run(all_of())
        for r, res, watch in zip(measured, results, watches, strict=True):
            res.update(watch.result)
            cpu_s = res["target_cpu_pct"] / 100
            res.update({"target": r.target.name, "workload": wl.name, "stream": wl.stream, "together": True,
                        "req_per_cpu_s": round(res["req_per_s"] / cpu_s, 1) if cpu_s > 0 else None})
            self.say(f"  {r.target.name:14s} {wl.name:14s} {point.label:12s} {res['req_per_s']:9.1f} req/s "
                     f"cpu {res['target_cpu_pct']}%  {res['req_per_cpu_s']} req/cpu-s  errors "
                     f"{sum(res['errors'].values())}  (together)")
        return results

    def measure_rounds(self, measured: list[Running], workload_index: int, point: Point) -> list[dict[str, Any]]:
        """`point` on every target, `load.rounds` times interleaved; one result per target (its median round)."""
        rounds = self.sc.load.rounds
        seen: dict[str, list[dict[str, Any]]] = {r.target.name: [] for r in measured}
        if self.sc.load.together:
            for _ in range(rounds):
                for r, res in zip(measured, self.measure_together(measured, workload_index, point), strict=True):
                    seen[r.target.name].append(res)
            return [median_round(seen[r.target.name]) if rounds > 1 else seen[r.target.name][0] for r in measured]
        if rounds == 1:
            return [self.measure(r, workload_index, point) for r in measured]
        for k in range(rounds):
            for r in measured[k % len(measured):] + measured[: k % len(measured)]:
                seen[r.target.name].append(self.measure(r, workload_index, point))
        return [median_round(seen[r.target.name]) for r in measured]

    def run(self) -> dict[str, Any]:
        started = time.time()
        results: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        groups = [self.sc.targets] if self.sc.lifecycle == "together" else [
            [h for h in self.sc.targets if not h.measure] + [t] for t in self.sc.targets if t.measure
        ]
        seen: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
        for cycle in range(self.sc.load.cycles):
            if self.sc.load.cycles > 1:
                self.say(f"cycle {cycle + 1}/{self.sc.load.cycles}")
            k = cycle % len(groups)
            for group in groups[k:] + groups[:k]:
                with self.up(group) as running:
                    measured = [r for r in running if r.target.measure and not r.skipped]
                    skipped.update({r.target.name: r.skipped for r in running if r.skipped})
                    for wi in range(len(self.sc.workloads)):
                        for point in self.points():
                            for res in self.measure_rounds(measured, wi, point):
                                seen.setdefault((res["target"], res["workload"], res["level"]), []).append(res)
        order = {t.name: i for i, t in enumerate(self.sc.targets)}
        for key in sorted(seen, key=lambda key: order[key[0]]):  # stable: workloads and levels keep their order
            results.append(median_round(seen[key]) if len(seen[key]) > 1 else seen[key][0])
        return {
            "scenario": self.sc.model_dump(mode="json"),
            "started": started,
            "wall_s": round(time.time() - started, 1),
            "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "skipped": skipped,
            "points": results,
        }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f}"
