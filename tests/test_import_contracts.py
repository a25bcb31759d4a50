"""The one-way imports (gateway -> serve -> models, training -> models) hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gateway_import_is_light() -> None:
    code = "import sys, gateway, models; bad=[m for m in ('vllm','torch') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_import_cycles() -> None:
    """No module imports, directly or not, a module that imports it back (TYPE_CHECKING imports count)."""
    import grimp

    graph = grimp.build_graph("gateway", "serve", "models", "training", "raygate", "benchmarks")
    cycles = [(m, dep) for m in sorted(graph.modules) for dep in graph.find_modules_directly_imported_by(m)
              if graph.chain_exists(importer=dep, imported=m)]
    assert not cycles, cycles
