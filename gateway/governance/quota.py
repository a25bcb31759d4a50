"""Quota limiters: reserve at admission, settle to real usage at the end.

`LocalQuota` is exact within one process (check and increment run with no await between
them). `RedisQuota` (quota_redis.py) is exact across processes. Both apply
`quota_policy`; errors map to 429s (or 503 when the store is down and fail_closed).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from gateway.errors import BudgetExhausted, QuotaExceeded, TokenRateExceeded
from gateway.governance.pricing import from_nanos
from gateway.governance.quota_policy import (
    BUDGETS,
    SPEND_COUNTERS,
    TOKEN_COUNTERS,
    Admission,
    Period,
    Rejection,
    Subject,
    costs,
    first_exceeded,
    limit_values,
    rate_headers,
    reject,
)

logger = logging.getLogger(__name__)

_MESSAGES = {
    "requests": "Rate limit reached for requests ({limit} per window) on {subject}. Retry after {retry}s.",
    "tokens": "Rate limit reached for tokens ({limit} per window) on {subject}. Retry after {retry}s.",
    "concurrent": "Too many concurrent requests ({limit} at once) on {subject}. Retry when one finishes.",
    "day": "You exceeded your daily token budget ({limit}) on {subject}.",
    "month": "You exceeded your monthly token budget ({limit}) on {subject}.",
    "spend_day": "You exceeded your daily spend budget ({amount}) on {subject}.",
    "spend_month": "You exceeded your monthly spend budget ({amount}) on {subject}.",
    "spend_total": "You exceeded your spend budget ({amount}) on {subject}.",
}


def rejection_error(r: Rejection) -> QuotaExceeded:
    message = _MESSAGES[r.kind].format(limit=r.limit, amount=f"{from_nanos(r.limit):g}", subject=r.subject,
                                       retry=r.retry_after_s)
    if r.dim in BUDGETS:
        return BudgetExhausted(message, headers=r.headers, kind=r.kind, subject=r.subject)
    cls = TokenRateExceeded if r.kind == "tokens" else QuotaExceeded
    return cls(message, retry_after_s=r.retry_after_s, headers=r.headers, kind=r.kind)


# What a subject used of each budget (BUDGETS: tokens of the day and month, spend of the day, month and all time)
# before this process counted: the ledger's sums.
BudgetSource = Callable[[Subject, Period], Awaitable[tuple[int, ...]]]


class Unseeded(Exception):  # noqa: N818 - a signal between a limiter and its base class, never raised further
    """Budget counters of these subjects do not exist in the store yet: a new period, a restarted gateway, a
    restarted Redis. They are seeded from the ledger before the admission is checked."""

    def __init__(self, subjects: list[Subject]) -> None:
        super().__init__()
        self.subjects = subjects


def lease_members(adm: Admission) -> list[str]:
    """The concurrency slots an admission holds: one a request it counts for."""
    return [adm.lease] if adm.requests == 1 else [f"{adm.lease}:{i}" for i in range(adm.requests)]


class QuotaLimiter(abc.ABC):
    """Admits or refuses a request against every subject's limits, atomically."""

    def __init__(self, window_s: float = 60.0, lease_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.lease_s = lease_s
        self.clock = clock
        self.fail_open_admissions = 0
        self.budgets: BudgetSource | None = None  # the ledger's sums; None: budgets start from zero
        # Admissions holding a concurrency slot, renewed every lease_s / 3 while they run: a slot outlives its
        # request only when the process holding it dies, and then by at most `lease_s`.
        self._held: dict[str, Admission] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def admit(self, subjects: list[Subject], reserve: int, requests: int = 1, spend: int = 0) -> Admission:
        """Reserve `requests` requests (one a prompt of a batch), `reserve` tokens and `spend` nano-units for every
        subject, or raise QuotaExceeded."""
        period = Period(self.clock(), self.window_s)
        adm = Admission(subjects, reserve, period, uuid.uuid4().hex, requests=max(1, requests), spend=spend)
        if not subjects:
            return adm
        try:
            adm = await self._admit(adm)
        except Unseeded as missing:
            # Budgets survive restarts: a budget counter this store does not hold yet starts from what the ledger
            # says was used in its period, then the admission is checked against it.
            for subject in missing.subjects:
                used = await self.budgets(subject, period) if self.budgets is not None else (0,) * len(BUDGETS)
                await self._seed(subject, period, used)
            adm = await self._admit(adm, check_seeded=False)
        if not adm.unchecked and any(s.limits.max_concurrent is not None for s in subjects):
            self._held[adm.lease] = adm
            if self._renewer is None:
                self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return adm

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            held = list(self._held.values())
            if held:
                try:
                    await self._extend(held, self.clock() + self.lease_s)
                except Exception:  # noqa: BLE001 - the next tick tries again; a lease lasts three ticks
                    logger.warning("renewing %d concurrency leases failed", len(held), exc_info=True)

    async def settle(self, adm: Admission, used_tokens: int, used_spend: int | None = None) -> None:
        """Replace the reservation by the tokens really used and the real cost (None: the reserved cost stands);
        frees the concurrency slot. Idempotent."""
        if adm.settled:
            return
        adm.settled = True
        self._held.pop(adm.lease, None)
        if adm.subjects and not adm.unchecked:
            await self._settle(adm, used_tokens - adm.reserve, 0 if used_spend is None else used_spend - adm.spend)

    @abc.abstractmethod
    async def used(self, subject: Subject) -> tuple[int, ...]:
        """What `subject` has used now in each of the DIMENSIONS."""

    @abc.abstractmethod
    async def _admit(self, adm: Admission, check_seeded: bool = True) -> Admission:
        """Check and reserve atomically; raise Unseeded first (when `check_seeded`) for subjects whose budget
        counters with a limit do not exist."""

    @abc.abstractmethod
    async def _seed(self, subject: Subject, period: Period, used: tuple[int, ...]) -> None:
        """Create the subject's budget counters (those of BUDGETS with a limit) holding `used` (one value each),
        unless they exist (another process seeded them first)."""

    @abc.abstractmethod
    async def _settle(self, adm: Admission, delta_tokens: int, delta_spend: int) -> None: ...

    @abc.abstractmethod
    async def _extend(self, held: list[Admission], expiry: float) -> None:
        """Move the concurrency leases of `held` (admissions still running) to expire at `expiry`."""

    @abc.abstractmethod
    async def claim(self, name: str, ttl_s: float | None) -> bool:
        """True for the first caller to claim `name` (in every process sharing the store) within `ttl_s` (None:
        for ever); False after, or when the store cannot say."""

    async def close(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LocalQuota(QuotaLimiter):
    """In-process counters; exact for one gateway process (the single-process default)."""

    def __init__(self, window_s: float = 60.0, lease_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        super().__init__(window_s, lease_s, clock)
        self._counts: dict[str, int] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._expiry: dict[str, float] = {}
        self._claims: dict[str, float] = {}
        self._admits = 0

    def _purge(self, now: float) -> None:
        """Drop counters of past windows and empty lease sets (bounded memory over days)."""
        for key in [k for k, exp in self._expiry.items() if exp <= now]:
            self._counts.pop(key, None)
            del self._expiry[key]
        for key in [k for k in self._leases if not self._live_leases(k, now)]:
            del self._leases[key]

    def _holds(self, key: str, now: float) -> bool:
        """Whether the counter `key` exists in its period (zero included)."""
        self._get(key, now)  # drops it if its period ended
        return key in self._counts

    def _get(self, key: str, now: float) -> int:
        exp = self._expiry.get(key)
        if exp is not None and exp <= now:
            self._counts.pop(key, None)
            self._expiry.pop(key, None)
        return self._counts.get(key, 0)

    def _live_leases(self, key: str, now: float) -> dict[str, float]:
        leases = self._leases.setdefault(key, {})
        for lease, exp in list(leases.items()):
            if exp <= now:
                del leases[lease]
        return leases

    async def used(self, subject: Subject) -> tuple[int, ...]:
        now = self.clock()
        keys = Period(now, self.window_s).keys(subject.id, "q")
        return tuple(len(self._live_leases(k, now)) if d == 2 else self._get(k, now) for d, k in enumerate(keys))

    async def _admit(self, adm: Admission, check_seeded: bool = True) -> Admission:
        now = adm.period.now
        self._admits += 1
        if self._admits % 4096 == 0:
            self._purge(now)
        prefix = "q"
        all_keys = [adm.period.keys(s.id, prefix) for s in adm.subjects]
        if check_seeded:
            missing = [s for s, keys in zip(adm.subjects, all_keys) if any(
                limit_values(s.limits)[d] is not None and not self._holds(keys[d], now) for d in BUDGETS)]
            if missing:
                raise Unseeded(missing)
        used = []
        for subj, keys in zip(adm.subjects, all_keys):
            u = tuple(
                len(self._live_leases(k, now)) if d == 2 else self._get(k, now) for d, k in enumerate(keys)
            )
            used.append(u)
            bad = first_exceeded(limit_values(subj.limits), u, adm.reserve, adm.requests, adm.spend)
            if bad is not None:
                raise rejection_error(reject(adm, used, len(used) - 1, bad))
        ttl = self._ttls()
        for subj, keys in zip(adm.subjects, all_keys):
            for d, (k, c, lim) in enumerate(zip(keys, costs(adm.reserve, adm.requests, adm.spend),
                                                limit_values(subj.limits))):
                if lim is None:
                    continue
                if d == 2:
                    leases = self._leases.setdefault(k, {})
                    for member in lease_members(adm):
                        leases[member] = now + self.lease_s
                else:
                    self._counts[k] = self._counts.get(k, 0) + c
                    lifetime = ttl[d]
                    if lifetime is not None:
                        self._expiry.setdefault(k, now + lifetime)
        adm.headers = rate_headers(adm.subjects, used, adm.reserve, adm.period, admitted=True, requests=adm.requests)
        return adm

    async def _extend(self, held: list[Admission], expiry: float) -> None:
        for adm in held:
            for subj in adm.subjects:
                leases = self._leases.get(adm.period.keys(subj.id, "q")[2])
                if leases is not None:
                    for member in lease_members(adm):
                        if member in leases:
                            leases[member] = expiry

    async def claim(self, name: str, ttl_s: float | None) -> bool:
        now = self.clock()
        if self._claims.get(name, now) > now:
            return False
        self._claims[name] = float("inf") if ttl_s is None else now + ttl_s
        return True

    def _ttls(self) -> tuple[float | None, ...]:
        """How long each counter outlives its period's start (None: for ever, the all-time spend)."""
        return (2 * self.window_s, 2 * self.window_s, 0, 2 * 86400, 32 * 86400, 2 * 86400, 32 * 86400, None)

    async def _seed(self, subject: Subject, period: Period, used: tuple[int, ...]) -> None:
        keys = period.keys(subject.id, "q")
        for d, value in zip(BUDGETS, used, strict=True):
            if limit_values(subject.limits)[d] is not None and keys[d] not in self._counts:
                self._counts[keys[d]] = value
                ttl = self._ttls()[d]
                if ttl is not None:
                    self._expiry[keys[d]] = period.now + ttl

    async def _settle(self, adm: Admission, delta_tokens: int, delta_spend: int) -> None:
        now = self.clock()
        for subj in adm.subjects:
            keys = adm.period.keys(subj.id, "q")
            leases = self._leases.get(keys[2], {})
            for member in lease_members(adm):
                leases.pop(member, None)
            for dims, delta in ((TOKEN_COUNTERS, delta_tokens), (SPEND_COUNTERS, delta_spend)):
                for d in dims:
                    count = self._get(keys[d], now)  # a counter of a period that ended is gone: nothing to settle
                    if keys[d] in self._counts:
                        self._counts[keys[d]] = max(0, count + delta)

