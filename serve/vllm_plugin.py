"""raygate's vLLM plugin: how long vLLM's engine processes spin on a shared-memory queue before they sleep.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (the engine core, every
worker). Its shared-memory message queues keep a reader spinning (`sched_yield`) for a second after each
read, then wait on a ZMQ notification. On a CPU host the engine core spins while its worker computes a
step, and the worker while the engine core schedules the next one: two runnable threads that everything
else on the host (the gateway, HAProxy, the client) has to take a core from. `RAYGATE_VLLM_SPIN_S` sets
that spin (0: sleep on the notification at once). Without it this plugin changes nothing, so a plain
vLLM server in the same environment is untouched.

vLLM's notifications are not reliable enough to sleep on after every message: the writer's PUB socket
has a send high-water mark of 1, so a notification sent before the reader's side has acknowledged the
previous one is dropped. A reader that sleeps often then sleeps through a message: the engine core and
its worker each waited on the other, for good (seen at 16 streams within seconds). With a spin set, the
writer's socket gets room for `NOTIFY_HWM` notifications and a reader never sleeps longer than
`WAKE_CAP_MS` without looking at its queue, so a lost notification costs at most that, never a hang.
"""

from __future__ import annotations

import os
from typing import Any

SPIN_ENV = "RAYGATE_VLLM_SPIN_S"
NOTIFY_HWM = 1000  # notifications a writer's socket holds (vLLM: 1); each is one byte
WAKE_CAP_MS = 20  # the longest a reader sleeps before it looks at its queue again


def spin_seconds(env: dict[str, str] | os._Environ[str] = os.environ) -> float | None:
    """The spin asked for, or None to leave vLLM's own (unset, empty, or not a number >= 0)."""
    raw = env.get(SPIN_ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def register() -> None:
    """vLLM's plugin hook: runs in every vLLM process, possibly more than once."""
    spin = spin_seconds()
    if spin is None:
        return
    import zmq
    from vllm.distributed.device_communicators import shm_broadcast

    cond = shm_broadcast.SpinCondition
    if getattr(cond, "_raygate_patched", False):
        return
    cond._raygate_patched = True  # type: ignore[attr-defined]
    original_init, original_wait = cond.__init__, cond.wait

    # vLLM loads plugins before it builds its queues (EngineCore.__init__, WorkerWrapperBase.init_worker):
    # every SpinCondition of an engine process is made by this __init__.
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = spin
            return
        # Rebind the writer's notify socket with room for more than one notification; readers connect
        # to it later (they are handed its address once the queue exists).
        old = self.local_notify_socket
        endpoint = old.getsockopt(zmq.LAST_ENDPOINT).decode()
        old.close(linger=0)
        sock = old.context.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, NOTIFY_HWM)
        sock.bind(endpoint)
        self.local_notify_socket = sock

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        if self.is_reader:
            timeout_ms = WAKE_CAP_MS if timeout_ms is None else min(timeout_ms, WAKE_CAP_MS)
        original_wait(self, timeout_ms)

    cond.__init__ = __init__  # type: ignore[method-assign]
    cond.wait = wait  # type: ignore[method-assign]
