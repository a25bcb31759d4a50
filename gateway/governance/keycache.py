"""Key lookups for the request path: HMAC, then a short-lived cache in front of the store.

Entries live `ttl_s` (0.5 s by default), so a key revoked anywhere is refused by every
gateway process within a second; an admin call in this process drops the entry at once.
Misses go to the store on a worker thread; concurrent misses for one key share a lookup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.governance.records import KeyRecord
from gateway.governance.store import KeyStore, reachable


class KeyCache:
    def __init__(
        self,
        store: KeyStore | None,
        hasher: Callable[[str], str],
        *,
        static: dict[str, KeyRecord] | None = None,
        ttl_s: float = 0.5,
        max_entries: int = 100_000,
    ) -> None:
        self.store = store
        self.hash = hasher
        self.static = dict(static or {})
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, KeyRecord | None]] = {}
        self._pending: dict[str, asyncio.Future[KeyRecord | None]] = {}

    async def get(self, key_hash: str) -> KeyRecord | None:
        record = self.static.get(key_hash)
        if record is not None:
            return record
        now = time.monotonic()
        hit = self._entries.get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self.store is None:
            return None
        pending = self._pending.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._pending[key_hash] = fut
        try:
            with reachable():
                record = await asyncio.to_thread(self.store.lookup, key_hash)
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key_hash] = (time.monotonic() + self.ttl_s, record)
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._pending[key_hash]

    def invalidate(self, key_hash: str | None = None) -> None:
        if key_hash is None:
            self._entries.clear()
        else:
            self._entries.pop(key_hash, None)
