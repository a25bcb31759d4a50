"""Budget alerts: a webhook POST when a key's or a team's budget use reaches a threshold.

Once per subject, budget, period and threshold across every gateway process: the limiter's store claims
each alert (Redis `SET NX`, or in-process). Posts run off the request path, a few tries each.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.governance.pricing import from_nanos
from gateway.governance.quota import QuotaLimiter
from gateway.governance.quota_policy import BUDGETS, DIMENSIONS, SPEND_COUNTERS, Period, Subject, limit_values

logger = logging.getLogger(__name__)

TRIES = 3


def reached(limits: tuple[int | None, ...], used: Sequence[int], thresholds: Sequence[float]) -> list[tuple[int, float]]:
    """(budget dimension, threshold) for every threshold a budget's use has reached (pure)."""
    out = []
    for d in BUDGETS:
        lim = limits[d]
        if lim is None:
            continue
        out += [(d, t) for t in thresholds if used[d] >= t * lim]
    return out


def signature(secret: bytes, body: bytes) -> str:
    """HMAC-SHA256 of an alert's body under `budget_alert_secret`, hex (the `x-raygate-signature` header)."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def period_of(dim: int, period: Period) -> str:
    """The period a budget counts in: its UTC day, its month, or `all`."""
    name = DIMENSIONS[dim]
    if name.endswith("day"):
        return period.day
    if name.endswith("month"):
        return period.month
    return "all"


class BudgetAlerts:
    """Checks a subject's budgets after its requests settle and posts each threshold reached, once."""

    def __init__(self, url: str, thresholds: Sequence[float], limiter: QuotaLimiter, currency: str,
                 secret: bytes | None = None) -> None:
        self.url, self.thresholds, self.limiter, self.currency = url, list(thresholds), limiter, currency
        self.secret = secret
        self.sent = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: Any = None

    async def check(self, subjects: Sequence[Subject], refused: tuple[str, str] | None = None) -> None:
        """Post an alert for every threshold the subjects' budgets reached that no process has posted; a request
        refused for a budget (`refused`: the subject's id and the budget's name) reaches its last threshold."""
        period = Period(self.limiter.clock(), self.limiter.window_s)
        for subject in subjects:
            limits = limit_values(subject.limits)
            if not any(limits[d] is not None for d in BUDGETS):
                continue
            try:
                used = await self.limiter.used(subject)
            except Exception:  # noqa: BLE001 - the store is down: the next settled request checks again
                logger.warning("budget alerts: could not read the use of %s", subject.id, exc_info=True)
                continue
            hits = reached(limits, used, self.thresholds)
            if refused is not None and refused[0] == subject.id and self.thresholds:
                hits.append((DIMENSIONS.index(refused[1]), self.thresholds[-1]))
            for dim, threshold in dict.fromkeys(hits):
                when = period_of(dim, period)
                tag = f"alert:{subject.id}:{DIMENSIONS[dim]}:{when}:{threshold:g}"
                if await self.limiter.claim(tag, ttl_s=None if when == "all" else 32 * 86400):
                    self._post_later(self._event(subject, dim, threshold, limits, used, period))

    def _event(self, subject: Subject, dim: int, threshold: float, limits: tuple[int | None, ...],
               used: Sequence[int], period: Period) -> dict[str, Any]:
        kind, _, name = subject.id.partition(":")
        spend = dim in SPEND_COUNTERS
        lim = limits[dim]
        assert lim is not None
        return {
            "type": "budget.threshold_reached", kind: name, "budget": DIMENSIONS[dim], "threshold": threshold,
            "period": period_of(dim, period), "limit": from_nanos(lim) if spend else lim,
            "used": from_nanos(used[dim]) if spend else used[dim], "unit": self.currency if spend else "tokens",
            "at": datetime.now(UTC).isoformat(),
        }

    def _post_later(self, event: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._post(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, event: dict[str, Any]) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10)
        body = orjson.dumps(event)
        headers = {"content-type": "application/json"}
        if self.secret is not None:
            headers["x-raygate-signature"] = "sha256=" + signature(self.secret, body)
        for attempt in range(TRIES):
            try:
                r = await self._client.post(self.url, content=body, headers=headers)
                if r.status_code < 500:
                    self.sent += 1
                    if r.status_code >= 400:
                        logger.warning("budget alert webhook answered %s: %s", r.status_code, r.text[:200])
                    return
            except httpx.HTTPError as exc:
                logger.warning("budget alert webhook failed (try %d of %d): %s", attempt + 1, TRIES, exc)
            await asyncio.sleep(2**attempt)
        self.failed += 1
        logger.error("budget alert not delivered after %d tries: %s", TRIES, event)

    async def close(self) -> None:
        """Wait for the posts under way (briefly), then close the client."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._client is not None:
            await self._client.aclose()
