"""What a `raygate up` that was killed (kill -9, a lost terminal) leaves behind, recognised and stopped.

A killed `raygate up` cannot stop its stack. Ray's GCS and raylet die with it (the kernel kills them), but
Ray's dashboard and runtime-env agents live on, holding the metrics port, and with them anything else
that outlived its parent. While a stack runs, `raygate up` keeps a record of the processes it started
(pid and start time, so a reused pid is never taken for one of them) in its home. The next start reads
the records of stacks whose `raygate up` is gone and stops what is left of them: those processes are
provably its own. A port held by anything else is named, never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class Started:
    """A process, identified beyond its pid by its start time."""

    pid: int
    created: float
    name: str

    @classmethod
    def of(cls, proc: psutil.Process) -> Started:
        return cls(proc.pid, proc.create_time(), proc.name())

    def alive(self) -> psutil.Process | None:
        """The process, if it is still this one (not a later process given the same pid)."""
        try:
            proc = psutil.Process(self.pid)
            return proc if proc.create_time() == self.created and proc.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None


class StackRecord:
    """The record of one running stack: `<dir>/<pid of raygate up>.json`, rewritten as the stack changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"{os.getpid()}.json"
        self._written: set[Started] = set()

    def write(self, procs: list[psutil.Process]) -> None:
        """Record `procs` (what the stack runs now) beside what was recorded before; atomic."""
        known = set(self._written)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                known.add(Started.of(p))
        if known == self._written:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        body = {"owner": _as_json(Started.of(psutil.Process())), "processes": [_as_json(s) for s in sorted(
            known, key=lambda s: s.pid)]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(self.path)
        self._written = known

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self._written = set()


def stop_leftovers(directory: Path, grace_s: float = 5.0) -> list[str]:
    """Stop the processes of stacks whose `raygate up` is gone; what was stopped ("pid (name)"), for the log.

    A record whose owner still runs belongs to a live stack and is left alone.
    """
    stopped: list[str] = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            body = json.loads(path.read_text())
            owner = _from_json(body["owner"])
            procs = [_from_json(p) for p in body["processes"]]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # half a record: nothing in it can be trusted
            continue
        if owner.alive() is not None:
            continue
        alive = [p for p in (s.alive() for s in procs) if p is not None]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                stopped.append(f"{p.pid} ({p.name()})")
                p.terminate()
        _, left = psutil.wait_procs(alive, timeout=grace_s)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=grace_s)
        path.unlink(missing_ok=True)
    return stopped


def _as_json(s: Started) -> list[object]:
    return [s.pid, s.created, s.name]


def _from_json(raw: list[Any]) -> Started:
    pid, created, name = raw
    return Started(int(pid), float(created), str(name))
