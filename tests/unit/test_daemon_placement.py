"""Which cores Ray's daemons run on beside vLLM's CPU workers: the policy, and the masks it sets on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from raygate.daemon_placement import confine, daemon_cores, engine_worker_cores
from tests.support import wait_until


@pytest.mark.parametrize(("allowed", "engine", "daemons"), [
    ({0, 1}, {0}, {1}),  # vLLM's binding on two cores: the worker on one, the engine core and the rest on the other
    ({0, 1, 2, 3}, {0, 2}, {1, 3}),
    ({0, 1}, set(), {0, 1}),  # no worker bound (GPU engines, none loaded): anywhere
    ({0, 1}, {0, 1}, {0, 1}),  # workers on every core (tensor parallel over all): nowhere else to go
    ({2, 3}, {0}, {2, 3}),  # a worker bound outside this process's cores leaves them all
])
def test_daemons_get_the_cores_no_engine_worker_is_bound_to(allowed: set[int], engine: set[int],
                                                           daemons: set[int]) -> None:
    assert daemon_cores(allowed, engine) == daemons


# A process with a few threads, named as vLLM names its workers and bound to one core, as vLLM binds them.
CHILD = """
import ctypes, os, sys, threading, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode())  # PR_SET_NAME: the title psutil reads
os.sched_setaffinity(0, {int(sys.argv[2])})
for _ in range(3):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def _child(name: str, core: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, name, str(core)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _masks(proc: subprocess.Popen[str]) -> list[set[int]]:
    return [os.sched_getaffinity(t.id) for t in psutil.Process(proc.pid).threads()]


def test_engine_workers_are_found_by_title_and_daemons_confined_thread_by_thread() -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores to bind a worker to one and the daemons to another")
    worker, other, daemon = _child("VLLM::Worker", cores[0]), _child("not-a-worker", cores[-1]), None
    try:
        procs = [psutil.Process(worker.pid), psutil.Process(other.pid)]
        assert engine_worker_cores(procs) == {cores[0]}  # only the process titled as vLLM's worker counts
        daemon = _child("gcs_server", cores[0])
        assert wait_until(lambda: len(_masks(daemon)) == 4, timeout_s=10)
        spare = daemon_cores(set(cores), engine_worker_cores(procs))
        confine([psutil.Process(daemon.pid)], spare)
        assert _masks(daemon) == [spare] * 4  # every thread, not only the main one
        confine([psutil.Process(daemon.pid)], set(cores))  # back everywhere once no worker is bound
        assert _masks(daemon) == [set(cores)] * 4
        gone = _child("gone", cores[0])
        ended = psutil.Process(gone.pid)
        gone.kill()
        gone.wait()
        confine([ended, psutil.Process(daemon.pid)], spare)  # a process that ended meanwhile is skipped
        assert _masks(daemon) == [spare] * 4
    finally:
        for proc in (worker, other, daemon):
            if proc is not None:
                proc.kill()
                proc.wait()
