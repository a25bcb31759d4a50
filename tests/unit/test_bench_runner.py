"""The bench runner's target processes: where they run and how they are stopped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from benchmarks.runner import Runner, stop
from benchmarks.scenario import Scenario

# Prints its session and process group, starts a child, then waits to be stopped.
_TARGET = (
    "import os, subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print(os.getsid(0), os.getpgid(0), child.pid, flush=True); time.sleep(600)"
)


def test_a_target_shares_the_load_generators_session_in_a_group_of_its_own(tmp_path: Path) -> None:
    # Linux schedules a session as one group (autogroup): a target in a session of its own took the cores
    # from the load generator whatever its nice level, so targets stay in the runner's session.
    target = {"name": "a", "model": "m", "start": [sys.executable, "-c", _TARGET], "ready_path": None}
    sc = Scenario.model_validate({"name": "t", "targets": [target], "load": {"levels": [1]}})
    run = Runner(sc, tmp_path / "out", workdir=tmp_path, quiet=True).launch(sc.targets[0])
    assert run.proc is not None and run.log is not None
    try:
        deadline = time.monotonic() + 30
        while not run.log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        sid, pgid, child = (int(x) for x in run.log.read_text().split())
        assert sid == os.getsid(0)
        assert pgid == run.proc.pid != os.getpgid(0)
    finally:
        stop(run.proc, grace_s=5)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, "stop left a child"
