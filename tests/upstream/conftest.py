"""A real fake upstream: `python -m serve.fake_server` as its own process on a free port."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import free_port


@pytest.fixture(scope="session")
def upstream() -> Iterator[str]:
    """Base URL (with /v1) of a fake server answering to model `up`, 2 ms between tokens."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve.fake_server", "--port", str(port), "--model", "up",
                             "--itl-ms", "2"])
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("fake upstream did not start")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)
