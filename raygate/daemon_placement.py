"""Which cores Ray's bookkeeping processes run on, on a host where vLLM's CPU workers compute.

vLLM's CPU build binds each worker's threads to cores of its own and leaves the rest (at least one) to its
engine-core process and the front end; vLLM's own server runs nothing else. A raygate stack adds Ray's daemons
(GCS, the dashboard, its modules and agent, the log monitor, Serve's controller), which wake many times a second:
left free, the kernel also runs them on the workers' cores, where each wake-up stalls the model's step. `raygate
up` keeps them on the cores the workers leave, where vLLM keeps its engine core, and moves them back when no
worker is bound (GPU engines, none loaded) or the workers hold every core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import psutil

WORKER_TITLE = "VLLM::Worker"  # vLLM's CPU (and GPU) worker processes; _TP<n> follows under tensor parallel


def daemon_cores(allowed: set[int], engine_cores: set[int]) -> set[int]:
    """The cores Ray's daemons may use: those of `allowed` that no engine worker is bound to; all of `allowed`
    when no worker is bound to any or the workers are bound to every one."""
    spare = allowed - engine_cores
    return spare if engine_cores and spare else set(allowed)


def engine_worker_cores(procs: Iterable[psutil.Process]) -> set[int]:
    """The cores vLLM's worker processes among `procs` are bound to (their main threads' masks)."""
    cores: set[int] = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.name().startswith(WORKER_TITLE):
                cores |= set(p.cpu_affinity())
    return cores


def confine(procs: Iterable[psutil.Process], cores: set[int]) -> None:
    """Every thread of `procs` on `cores` (Linux binds threads: each has its own mask, which the threads it
    starts later inherit); processes or threads that are gone are skipped."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            for t in p.threads():
                with contextlib.suppress(OSError):
                    if os.sched_getaffinity(t.id) != cores:
                        os.sched_setaffinity(t.id, cores)
