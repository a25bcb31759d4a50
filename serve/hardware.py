"""What the machine a replica runs on can do, for choices like the compute dtype."""

from __future__ import annotations

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


def split_cores(cores: list[int]) -> tuple[list[int], list[int]]:
    """Split a CPU-only host's cores into (Ray's processes, the vLLM worker).

    vLLM's CPU worker is the only compute thread; under Ray it got 61-88% of a core while
    Ray's raylet, GCS, controller, HAProxy and replicas shared it (98-99% alone). Giving it
    cores of its own recovered that. One host core in four (at least one) stays with Ray.
    On a single core there is nothing to split: both get it.
    """
    cores = sorted(cores)
    if len(cores) < 2:
        return cores, cores
    n_ray = max(1, len(cores) // 4)
    return cores[:n_ray], cores[n_ray:]


def available_cores() -> list[int]:
    """The cores this process may run on."""
    import os

    return sorted(os.sched_getaffinity(0))

