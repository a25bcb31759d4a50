"""The bench runner's target processes: where they run and how they are stopped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from benchmarks.runner import Runner, stop
from benchmarks.scenario import Scenario
from tests.support import wait_until

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
    # Killed with its group, the child may take a moment to die after its parent was reaped.
    assert wait_until(lambda: not _alive(child), timeout_s=10, every_s=0.05), "stop left a child"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_terminated_run_stops_the_target_it_started(tmp_path: Path) -> None:
    import signal
    import subprocess

    import yaml

    pidfile = tmp_path / "child.pid"
    target = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pidfile)!r}, 'w').write(str(child.pid)); time.sleep(600)"
    )
    scenario = {"name": "t", "targets": [{"name": "a", "model": "m", "start": [sys.executable, "-c", target],
                                          "ready_timeout_s": 300}],  # never ready: the run waits on it
                "load": {"levels": [1]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    bench = subprocess.Popen([sys.executable, "-m", "benchmarks", "run", str(tmp_path / "s.yaml"), "--out",
                              str(tmp_path / "out"), "--no-plots", "--no-progress"], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        bench.kill()
    gone = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE and time.monotonic() < gone:
        time.sleep(0.05)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, "target left running"
