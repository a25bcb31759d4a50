"""A stop waits for every process of its Ray cluster and kills what outlives it (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys

import psutil

from raygate.stack import _ray_package_dir, reap, stack_processes
from tests.support import wait_until

# What Ray starts runs from Ray's package directory (argv[0] here, as the GCS and the raylet do); under it an
# engine that ignores SIGTERM like a busy one.
_RAY_DAEMON = f"exec -a {_ray_package_dir()}/core/src/ray/raylet/raylet {sys.executable} -c " + '"' + (
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
    "import time; time.sleep(600)") + '"'


def test_a_stop_finds_its_ray_processes_and_kills_what_outlives_the_grace() -> None:
    ray_like = subprocess.Popen(["bash", "-c", _RAY_DAEMON])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert wait_until(lambda: any(p.pid == ray_like.pid for p in stack_processes())
                          and psutil.Process(ray_like.pid).children(), 10, every_s=0.05)
        found = {p.pid for p in stack_processes()}  # (a live session stack's processes are found too)
        engine = psutil.Process(ray_like.pid).children()[0]
        assert {ray_like.pid, engine.pid} <= found and other.pid not in found
        ray_like.terminate()  # the daemon exits when asked; its engine does not
        assert sorted(reap([psutil.Process(ray_like.pid), engine], grace_s=0.5)) == [engine.pid]
        assert not engine.is_running() and other.poll() is None
        assert reap([], grace_s=0.1) == []
    finally:
        for p in (ray_like, other):
            p.kill()
            p.wait()


def test_a_process_that_exits_on_its_own_is_not_killed() -> None:
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    assert reap([psutil.Process(quick.pid)], grace_s=5) == []
    assert quick.wait(1) == 0
