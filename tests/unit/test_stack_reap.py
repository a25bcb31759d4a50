"""A stop reaps the vLLM engine processes its replicas could not close (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from raygate.stack import engine_processes, reap

# A child that names itself as vLLM's engine core does (prctl PR_SET_NAME), then ignores SIGTERM like a busy one.
_ENGINE = """
import ctypes, signal, time
ctypes.CDLL(None).prctl(15, b"VLLM::EngineCor", 0, 0, 0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


def test_engine_processes_left_behind_are_killed() -> None:
    engine = subprocess.Popen([sys.executable, "-c", _ENGINE])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        deadline = time.monotonic() + 10
        while engine.pid not in {p.pid for p in engine_processes()}:
            assert time.monotonic() < deadline, "the engine-named child was not found"
            time.sleep(0.05)
        found = {p.pid: p for p in engine_processes()}  # (a live session stack's engines are found too)
        assert other.pid not in found  # only vLLM's processes
        assert reap([found[engine.pid]], grace_s=0.2) == [engine.pid]
        engine.wait(5)  # gone (psutil reaped it, so its status reads 0 here)
        assert not psutil.pid_exists(engine.pid) and other.poll() is None
        assert reap([], grace_s=0.1) == []
    finally:
        for p in (engine, other):
            p.kill()
            p.wait()


def test_an_engine_that_exits_on_its_own_is_not_killed() -> None:
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    assert reap([psutil.Process(quick.pid)], grace_s=5) == []
    assert quick.wait(1) == 0
