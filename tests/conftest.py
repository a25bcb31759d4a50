"""Fixtures every test package may use (tests/support.py holds the helpers behind them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PrivateRedis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own (to stop and restart; the machine's stays untouched)."""
    server = PrivateRedis(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(private_redis: PrivateRedis) -> str:
    """An empty Redis of this test's own."""
    return private_redis.url


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """One redis-server for a whole session's stacks (Ray replicas share quotas through it)."""
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
