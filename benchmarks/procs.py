"""CPU and memory of the processes a benchmark watches (a target's process tree), via psutil."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (those still alive)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def title(cmdline: list[str], name: str) -> str:
    """A readable name for a process: Ray's process titles as they are, python scripts by script or module."""
    if not cmdline:
        return name
    head = cmdline[0].split("/")[-1]
    if head.startswith("python") and len(cmdline) > 1:
        args = iter(cmdline[1:])
        for arg in args:
            if arg == "-m":
                return next(args, head)
            if arg == "-c":
                return f"{head} -c"
            if not arg.startswith("-"):
                return arg.split("/")[-1]
    return " ".join(cmdline[:1]).split("/")[-1] if "/" in cmdline[0] else cmdline[0]


def rss_by_name(pid: int) -> dict[str, int]:
    """RSS (bytes) of a process tree, summed per process title (`ray::ServeReplica:...`, `raylet`, ...)."""
    out: dict[str, int] = {}
    for p in tree(pid):
        try:
            name = title(p.cmdline(), p.name())[:60]
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        out[name] = out.get(name, 0) + rss
    return out


class Watch:
    """CPU use (% of one core) of watched trees, the load generator and the whole machine over a window."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.me = psutil.Process(os.getpid())

    def __enter__(self) -> Watch:
        self.procs = [p for pid in self.pids for p in tree(pid)]
        self.t0 = time.perf_counter()
        self.cpu0 = _cpu(self.procs)
        self.me0 = sum(self.me.cpu_times()[:2])
        self.sys0 = psutil.cpu_times()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        cpu1 = _cpu(self.procs)
        watched = sum(cpu1[pid] - self.cpu0[pid] for pid in cpu1 if pid in self.cpu0)
        by_process: dict[str, float] = {}
        for p in self.procs:
            if p.pid in cpu1 and p.pid in self.cpu0:
                try:
                    name = title(p.cmdline(), p.name())[:60]
                except psutil.Error:
                    continue
                by_process[name] = by_process.get(name, 0.0) + cpu1[p.pid] - self.cpu0[p.pid]
        self.cpu_s_by_process = by_process
        mine = sum(self.me.cpu_times()[:2]) - self.me0
        sys1 = psutil.cpu_times()
        busy = (sum(sys1) - sys1.idle - getattr(sys1, "iowait", 0.0)) - (
            sum(self.sys0) - self.sys0.idle - getattr(self.sys0, "iowait", 0.0)
        )
        rss = 0
        for p in self.procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        self.result = {
            "target_cpu_pct": round(100 * watched / wall, 1),
            "loadgen_cpu_pct": round(100 * mine / wall, 1),
            "other_cpu_pct": round(100 * max(0.0, busy - watched - mine) / wall, 1),
            "target_rss_mb": round(rss / 2**20, 1),
            # CPU-seconds of the window by process title, largest first (engine and front-end processes apart)
            "target_cpu_s_by_process": {k: round(v, 3) for k, v in sorted(by_process.items(), key=lambda kv: -kv[1])
                                        if v > 0},
        }
