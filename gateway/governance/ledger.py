"""The usage ledger: one row per request, written in batches off the request path.

`record` only appends to a list. A background task writes batches every
`flush_interval_s` on a worker thread; a failed write keeps its rows for the next try
(up to `max_pending`, then the oldest are dropped and counted). `close` writes what is left.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import DataError, IntegrityError

from gateway.governance.records import UsageRow
from gateway.governance.store import KeyStore

logger = logging.getLogger(__name__)


class UsageLedger:
    def __init__(
        self, store: KeyStore, *, flush_interval_s: float = 1.0, batch_size: int = 1000, max_pending: int = 200_000
    ) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self._pending: list[UsageRow] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def record(self, row: UsageRow) -> None:
        self._pending.append(row)
        if len(self._pending) > self.max_pending:
            drop = len(self._pending) - self.max_pending
            del self._pending[:drop]
            self.dropped += drop
            logger.error("usage ledger backlog full: dropped %d rows", drop)
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - keep the rows, try again next tick
                logger.warning("usage ledger write failed (%d rows kept): %s", len(self._pending), exc)

    async def flush(self) -> None:
        async with self._lock:
            while self._pending:
                batch = self._pending[: self.batch_size]
                try:
                    await asyncio.to_thread(self.store.insert_usage, batch)
                except (DataError, IntegrityError):
                    # The database refuses a row itself (not an outage): written one by one, the refused are
                    # dropped and counted, so one bad row never holds back every row after it.
                    await asyncio.to_thread(self._insert_each, batch)
                del self._pending[: len(batch)]
                self.written += len(batch)

    def _insert_each(self, batch: list[UsageRow]) -> None:
        for row in batch:
            try:
                self.store.insert_usage([row])
            except (DataError, IntegrityError) as exc:
                self.dropped += 1
                logger.error("usage row %s refused by the database, dropped: %s", row.request_id, exc)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        """Stop the writer and write every pending row."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.flush()
