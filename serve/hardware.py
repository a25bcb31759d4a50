"""What the machine a replica runs on can do, for choices like the compute dtype."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags (from /proc/cpuinfo; empty where it is unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_supports_bf16(flags: set[str] | None = None) -> bool:
    """True where bf16 matmuls run natively; elsewhere they are emulated (about 3x slower here)."""
    return bool((cpu_flags() if flags is None else flags) & _BF16_FLAGS)


# vLLM's CPU workers pin their OpenMP threads to the cores named here, one list per worker (`0-3|4-7`).
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def split_cores(cores: Sequence[int], workers: int) -> str:
    """`cores` in `workers` contiguous groups of (nearly) equal size, as vLLM's CPU binding reads them (`0|1`);
    ValueError when there are fewer cores than workers."""
    ordered = sorted(cores)
    if len(ordered) < workers:
        raise ValueError(f"{workers} CPU workers (tensor x pipeline parallel) need {workers} cores; "
                         f"this process may use {len(ordered)}")
    size, extra = divmod(len(ordered), workers)
    groups, start = [], 0
    for rank in range(workers):
        end = start + size + (rank < extra)
        groups.append(",".join(str(c) for c in ordered[start:end]))
        start = end
    return "|".join(groups)


@contextlib.contextmanager
def cpu_worker_binding(workers: int) -> Iterator[None]:
    """While an engine's processes start: vLLM's CPU binding for `workers` > 1 workers, splitting the cores this
    process may use (vLLM's own binding gives each worker a NUMA node, and refuses more workers than nodes).

    Set in this process's environment for the engine-core process to inherit, and restored after: the engines of
    one replica start one at a time. A binding the operator set (`VLLM_CPU_OMP_THREADS_BIND`) is kept.
    """
    if workers <= 1 or CPU_BIND_ENV in os.environ:
        yield
        return
    os.environ[CPU_BIND_ENV] = split_cores(sorted(os.sched_getaffinity(0)), workers)
    try:
        yield
    finally:
        os.environ.pop(CPU_BIND_ENV, None)
