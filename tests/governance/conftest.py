"""Real PostgreSQL for the governance tests: a database of our own, dropped afterwards (Redis: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import own_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of our own on the machine's PostgreSQL, dropped afterwards."""
    with own_database() as url:
        yield url
