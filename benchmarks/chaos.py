"""Faults under load: `raygate up` as shipped, minutes of streamed chat, and what an operator's bad day does to it.

The stack is `raygate up` with its default model on vLLM, quotas in a Redis of the run's own (a key with limits,
so every request is admitted and settled there). Clients stream chat completions, each on a new connection,
honouring `Retry-After` as the official SDKs do. On a schedule the run SIGKILLs the gateway replica, kills
vLLM's engine-core process, restarts Redis, and rolls the model out to a second version and back
(`raygate models promote`, `raygate models rollback`), as an operator would. Every attempt is recorded:

- `ok`: a 200 stream that ended with `[DONE]`;
- `<status> <code>`: an error envelope (`503 no_replica`, `503 engine_unavailable`, ...);
- `200 cut` / `200 error <code>`: a stream that started and then broke (what a killed replica does to the
  requests it held, and nothing else should);
- an exception's name: the connection failed (`ConnectError`) or hung (`ReadTimeout`).

Reported: attempts, successes, failures by kind, and per fault its outage: the time from the fault to the first
success of a request sent after it, where a request sent in between failed (0 where none did); and the longest
stretch with no success at all.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks.runner import free_port

MODEL = "raygate/tiny-chat"


@dataclass
class Attempt:
    start: float
    end: float
    kind: str


@dataclass
class Fault:
    name: str
    at: float
    note: str = ""


@dataclass
class Drill:
    """One chaos run's stack, clients and faults."""

    workdir: Path
    minutes: float
    concurrency: int
    max_tokens: int = 32
    request_timeout_s: float = 30.0
    port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    attempts: list[Attempt] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    key: str = ""
    t0: float = 0.0

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    def raygate(self, *args: str, check: bool = True) -> str:
        exe = Path(sys.executable).with_name("raygate")
        out = subprocess.run([str(exe), "--home", str(self.home), *args], capture_output=True, text=True,
                             timeout=600)
        if check and out.returncode != 0:
            raise RuntimeError(f"raygate {' '.join(args)} failed: {out.stderr[-2000:]}")
        return out.stdout

    # -- the stack ------------------------------------------------------------------------------

    def start_redis(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.redis_port), 0.2):
                return proc
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def config(self) -> Path:
        path = self.workdir / "raygate.yaml"
        path.write_text(yaml.safe_dump({
            "gateway": {"settings": {"redis_url": f"redis://127.0.0.1:{self.redis_port}/0"}},
            "serve": {"registry": str(self.home / "registry"),
                      "models": [{"model": f"{MODEL}@stable", "engine": "vllm",
                                  "engine_kwargs": {"max_model_len": 2048}}]},
        }))
        return path

    def start_stack(self) -> subprocess.Popen[str]:
        self.raygate("models", "build-default")
        versions = self.home / "registry" / MODEL / "versions"
        if not (versions / "2").exists():  # the roll-out's target: the same weights as a version of their own
            self.raygate("models", "add", MODEL, str(versions / "1"))
        exe = Path(sys.executable).with_name("raygate")
        log = open(self.workdir / "up.log", "w")  # noqa: SIM115 - open for the stack's whole life
        proc = subprocess.Popen(
            [str(exe), "--home", str(self.home), "up", "--config", str(self.config()), "--port", str(self.port),
             "--dashboard-port", str(free_port()), "--metrics-port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while "Ctrl-C stops everything" not in (self.workdir / "up.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("raygate up did not start:\n" + (self.workdir / "up.log").read_text()[-3000:])
            time.sleep(1)
        self.key = self._key_with_limits()
        return proc

    def _key_with_limits(self) -> str:
        """A key whose every request is admitted and settled in Redis (limits that never refuse)."""
        admin = (self.home / "admin-key").read_text().strip()
        r = httpx.post(f"http://127.0.0.1:{self.port}/admin/keys", headers={"Authorization": f"Bearer {admin}"},
                       json={"name": "chaos", "limits": {"rpm": 1_000_000, "max_concurrent": 1000}}, timeout=30)
        r.raise_for_status()
        return str(r.json()["key"])

    # -- clients --------------------------------------------------------------------------------

    def client(self, stop: threading.Event) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": self.max_tokens, "stream": True}
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(timeout=self.request_timeout_s, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while not stop.is_set():
                start = time.monotonic()
                wait = 0.0
                try:
                    with c.stream("POST", url, json=body, headers=headers) as r:
                        if r.status_code != 200:
                            r.read()
                            kind = f"{r.status_code} {_code(r.content)}"
                            wait = min(float(r.headers.get("retry-after", 1)), 2.0)
                        else:
                            kind = "200 cut"
                            for line in r.iter_lines():
                                if line == "data: [DONE]":
                                    kind = "ok" if kind == "200 cut" else kind
                                elif line.startswith('data: {"error"'):
                                    kind = f"200 error {_code(line[6:].encode())}"
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                    wait = 0.2
                self.attempts.append(Attempt(start - self.t0, time.monotonic() - self.t0, kind))
                if wait:
                    stop.wait(wait)

    # -- faults ---------------------------------------------------------------------------------

    def _stack_processes(self, up: subprocess.Popen[str]) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(up.pid).children(recursive=True)
        return []

    def kill_replica(self, up: subprocess.Popen[str]) -> str:
        replicas = [p for p in self._stack_processes(up) if _title(p).startswith("ray::ServeReplica:")
                    and ":gateway" in _title(p)]
        for p in replicas:
            p.kill()
        return f"SIGKILL gateway replica pid {[p.pid for p in replicas]}"

    def kill_engine(self, up: subprocess.Popen[str]) -> str:
        engines = [p for p in self._stack_processes(up) if p.name().startswith("VLLM::EngineCor")]
        for p in engines:
            p.kill()
        return f"SIGKILL vLLM engine core pid {[p.pid for p in engines]}"

    def schedule(self, up: subprocess.Popen[str], redis: list[subprocess.Popen[bytes]]) -> list[
            tuple[float, str, Callable[[], str]]]:
        def restart_redis() -> str:
            redis[0].terminate()
            redis[0].wait(10)
            time.sleep(2)
            redis[0] = self.start_redis()
            return "Redis stopped, down 2 s, started empty"

        return [
            (0.10, "replica kill", lambda: self.kill_replica(up)),
            (0.30, "engine kill", lambda: self.kill_engine(up)),
            (0.50, "Redis restart", restart_redis),
            (0.62, "roll-out", lambda: self.raygate("models", "promote", f"{MODEL}@2").strip()),
            (0.77, "roll-back", lambda: self.raygate("models", "rollback", MODEL).strip()),
            (0.90, "replica kill", lambda: self.kill_replica(up)),
        ]

    def run(self) -> dict[str, Any]:
        redis = [self.start_redis()]
        up = self.start_stack()
        stop = threading.Event()
        duration = self.minutes * 60
        try:
            self.t0 = time.monotonic()
            clients = [threading.Thread(target=self.client, args=(stop,), daemon=True)
                       for _ in range(self.concurrency)]
            for t in clients:
                t.start()
            for at, name, action in self.schedule(up, redis):
                delay = self.t0 + at * duration - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                when = time.monotonic() - self.t0  # when it begins: Redis is down for the 2 s the action takes
                note = action().splitlines()[0]
                self.faults.append(Fault(name, when, note))
                print(f"[chaos] {when:6.1f} s  {name}: {note}", flush=True)
            time.sleep(max(0.0, self.t0 + duration - time.monotonic()))
            stop.set()
            for t in clients:
                t.join(self.request_timeout_s + 5)
        finally:
            stop.set()
            with contextlib.suppress(ProcessLookupError):
                up.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                up.wait(120)
            if up.poll() is None:
                up.kill()
            redis[0].terminate()
            redis[0].wait(10)
        return summarize(self.attempts, self.faults, duration, self.concurrency)


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def _code(body: bytes) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        return str(json.loads(body)["error"]["code"])
    return "?"


def summarize(attempts: list[Attempt], faults: list[Fault], duration_s: float, concurrency: int) -> dict[str, Any]:
    """The run's figures (pure: attempts and faults in, report out)."""
    kinds = Counter(a.kind for a in attempts)
    ok_ends = sorted(a.end for a in attempts if a.kind == "ok")
    per_fault: list[dict[str, Any]] = []
    outages: list[float] = []
    for f in faults:
        after = [a for a in attempts if a.start >= f.at]
        first_ok = min((a.start for a in after if a.kind == "ok"), default=None)
        window = [a for a in after if first_ok is None or a.start < first_ok]
        in_flight = [a for a in attempts if a.start < f.at <= a.end]
        # The outage: from the fault to the first success sent after it, when a request sent in between failed
        # (none failed: no outage, whatever the clients' own latency).
        failed_between = any(a.kind != "ok" for a in window)
        outage = duration_s if first_ok is None else (first_ok - f.at if failed_between else 0.0)
        outages.append(outage)
        per_fault.append({
            "fault": f.name, "at_s": round(f.at, 1), "what": f.note,
            "outage_s": None if first_ok is None else round(outage, 2),
            "new_requests_failed": dict(Counter(a.kind for a in window if a.kind != "ok")),
            "in_flight_failed": dict(Counter(a.kind for a in in_flight if a.kind != "ok")),
        })
    gaps = [b - a for a, b in zip(ok_ends, ok_ends[1:], strict=False)]
    return {
        "duration_s": duration_s, "concurrency": concurrency, "attempts": len(attempts), "ok": kinds.get("ok", 0),
        "failed": {k: v for k, v in sorted(kinds.items()) if k != "ok"},
        "faults": per_fault,
        "longest_outage_s": round(max(outages, default=0.0), 2),
        "longest_without_success_s": round(max(gaps, default=0.0), 2),
        "accepted_then_cut": sum(v for k, v in kinds.items() if k.startswith("200 ")),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Chaos: {result['duration_s'] / 60:g} minutes, {result['concurrency']} streaming clients",
        "",
        f"- attempts {result['attempts']}, ok {result['ok']}, failed {sum(result['failed'].values())}: "
        + (", ".join(f"{k} × {v}" for k, v in result["failed"].items()) or "none"),
        f"- streams accepted then cut: {result['accepted_then_cut']}",
        f"- longest outage after a fault: {result['longest_outage_s']} s; longest stretch with no success: "
        f"{result['longest_without_success_s']} s",
        "",
        "| at | fault | outage (fault to the first success sent after it, if any failed between) | new requests failed | in flight failed |",
        "|---|---|---|---|---|",
    ]
    for f in result["faults"]:
        outage = "never" if f["outage_s"] is None else f"{f['outage_s']} s"
        lines.append(f"| {f['at_s']} s | {f['fault']} ({f['what']}) | {outage} | "
                     f"{_counts(f['new_requests_failed'])} | {_counts(f['in_flight_failed'])} |")
    return "\n".join(lines) + "\n"


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} × {v}" for k, v in c.items()) or "none"


def run(minutes: float, concurrency: int, out: Path) -> dict[str, Any]:
    """One drill in a directory of its own; the report written to `out` (report.md, report.json)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("chaos needs redis-server on PATH (a Redis of its own, restarted during the run)")
    workdir = Path(tempfile.mkdtemp(prefix="rg-chaos-"))
    result = Drill(workdir, minutes, concurrency).run()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {out / 'report.md'}, {out / 'report.json'} (stack log: {workdir / 'up.log'})")
    return result
