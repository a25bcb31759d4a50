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
