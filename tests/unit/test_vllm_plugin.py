"""raygate's vLLM plugin: the shared-memory queue spin, set per engine through the environment."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from serve.vllm_plugin import NOTIFY_HWM, SPIN_ENV, spin_seconds


@pytest.mark.parametrize(("raw", "value"), [("0", 0.0), ("0.002", 0.002), (" 1 ", 1.0)])
def test_spin_is_a_number_of_seconds(raw: str, value: float) -> None:
    assert spin_seconds({SPIN_ENV: raw}) == value


@pytest.mark.parametrize("env", [{}, {SPIN_ENV: ""}, {SPIN_ENV: "fast"}, {SPIN_ENV: "-1"}, {SPIN_ENV: "nan"}])
def test_anything_else_leaves_vllm_alone(env: dict[str, str]) -> None:
    assert spin_seconds(env) is None


def test_vllm_finds_the_plugin() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("raygate_spin") == "serve.vllm_plugin:register"


_PROBE = """
import time, zmq
from vllm.plugins import load_general_plugins
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
load_general_plugins()
from serve.vllm_plugin import register
register()  # vLLM may load plugins more than once per process
ctx = zmq.Context()
writer = SpinCondition(is_reader=False, context=ctx, notify_address="ipc:///tmp/raygate-spin-probe")
reader = SpinCondition(is_reader=True, context=ctx, notify_address="ipc:///tmp/raygate-spin-probe")
reader.record_read()
t = time.monotonic()
reader.wait(timeout_ms=2000)  # nothing is written: a spinning reader returns at once, a sleeping one times out
waited = time.monotonic() - t
writer.notify()
t = time.monotonic()
reader.wait(timeout_ms=2000)
woke = time.monotonic() - t
kind = "spun" if waited < 0.01 else "capped" if waited < 1 else "slept"
print(round(reader.busy_loop_s, 3), writer.local_notify_socket.getsockopt(zmq.SNDHWM), kind, woke < 0.5)
"""


@pytest.mark.parametrize(("env", "expected"), [({SPIN_ENV: "0"}, ["0.0", str(NOTIFY_HWM), "capped", "True"]),
                                               ({}, ["1", "1", "spun", "True"])])
def test_a_reader_sleeps_on_its_socket_only_when_asked(env: dict[str, str], expected: list[str]) -> None:
    """Asked: it sleeps, at most WAKE_CAP_MS, is woken by the writer's notification, and the writer's
    socket has room for NOTIFY_HWM notifications. Not asked: vLLM's own spin and high-water mark of 1."""
    import os

    base = {k: v for k, v in os.environ.items() if k != SPIN_ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split("\n")[-2].split() == expected, out.stderr[-2000:]


def test_engine_queues_never_hang_when_every_wait_sleeps(tmp_path: Path) -> None:
    """Two processes pass 3,000 messages back and forth over vLLM's shared-memory queues, each side
    sleeping on every wait (spin 0), as the engine core and its worker do once per step. With vLLM's own
    notify socket (high-water mark 1) and no cap on a sleep, this hung within the first thousand."""
    import os

    script = tmp_path / "pingpong.py"
    script.write_text(_PINGPONG)
    env = {**os.environ, SPIN_ENV: "0", "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, str(script), "3000"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "3000 round trips" in out.stdout, out.stderr[-3000:]


_PINGPONG = """
import multiprocessing as mp, sys, time


def echo(handle_in, q):
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    inbox = MessageQueue.create_from_handle(handle_in, 0)
    outbox = MessageQueue(1, 1)
    q.put(outbox.export_handle())
    inbox.wait_until_ready()
    outbox.wait_until_ready()
    while True:
        msg = inbox.dequeue(indefinite=True)
        outbox.enqueue(msg)
        if msg is None:
            return


if __name__ == "__main__":
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    n = int(sys.argv[1])
    ctx = mp.get_context("spawn")
    outbox = MessageQueue(1, 1)
    q = ctx.Queue()
    p = ctx.Process(target=echo, args=(outbox.export_handle(), q), daemon=True)
    p.start()
    inbox = MessageQueue.create_from_handle(q.get(timeout=60), 0)
    outbox.wait_until_ready()
    inbox.wait_until_ready()
    t = time.monotonic()
    for i in range(n):
        outbox.enqueue(i)
        assert inbox.dequeue(timeout=30) == i
    outbox.enqueue(None)
    inbox.dequeue(timeout=30)
    p.join(10)
    print(f"{n} round trips in {time.monotonic() - t:.2f} s", flush=True)
"""


def test_the_spin_is_set_only_for_what_starts_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from serve.vllm_engine import _environ

    monkeypatch.delenv(SPIN_ENV, raising=False)
    with _environ(SPIN_ENV, "0.0"):
        assert os.environ[SPIN_ENV] == "0.0"
    assert SPIN_ENV not in os.environ
    monkeypatch.setenv(SPIN_ENV, "0.25")  # an operator's own setting survives an engine start
    with _environ(SPIN_ENV, "0.0"):
        assert os.environ[SPIN_ENV] == "0.0"
    assert os.environ[SPIN_ENV] == "0.25"
    with _environ(SPIN_ENV, None):
        assert os.environ[SPIN_ENV] == "0.25"
