"""Quotas exact across gateway processes: one atomic Lua script to admit, one to settle.

The script applies `quota_policy` to every subject before changing anything, so a
request is admitted for all its subjects (key and team) or for none. When Redis cannot
be reached the `failure_mode` decides: `fail_closed` answers 503, `fail_open` admits and
counts it (`fail_open_admissions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from gateway.errors import QuotaUnavailable
from gateway.governance.quota import QuotaLimiter, Unseeded, lease_members, rejection_error
from gateway.governance.quota_policy import (
    BUDGETS,
    DIMENSIONS,
    Admission,
    Period,
    Subject,
    limit_values,
    rate_headers,
    reject,
)

logger = logging.getLogger(__name__)

# KEYS: eight per subject (rpm, tpm, conc, day, month, spend_day, spend_month, spend). ARGV: now_ms, reserve,
# requests, lease_expiry_ms, window_ms, check_seeded (1/0), spend, then eight limits per subject (-1: none), then
# the `requests` lease members. Returns {1, used...} (eight per subject, before this admission), {0, subject_index,
# dim, used...}, or {2, subject_index...}: those subjects' budget counters (with a limit) do not exist yet.
ADMIT = """
local D = 8
local H = 7
local n = #KEYS / D
local now = tonumber(ARGV[1])
local reserve = tonumber(ARGV[2])
local requests = tonumber(ARGV[3])
local spend = tonumber(ARGV[7])
local cost = {requests, reserve, requests, reserve, reserve, spend, spend, spend}
local members = H + n * D
if tonumber(ARGV[6]) == 1 then
  local missing = {}
  for i = 0, n - 1 do
    local k = i * D
    for d = 4, 8 do
      if tonumber(ARGV[H + k + d]) >= 0 and redis.call('EXISTS', KEYS[k + d]) == 0 then
        table.insert(missing, i)
        break
      end
    end
  end
  if #missing > 0 then
    return {2, unpack(missing)}
  end
end
local used = {}
for i = 0, n - 1 do
  local k = i * D
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
  local u = {}
  for d = 1, D do
    if d == 3 then
      u[d] = redis.call('ZCARD', KEYS[k + 3])
    else
      u[d] = tonumber(redis.call('GET', KEYS[k + d]) or '0')
    end
    table.insert(used, u[d])
  end
  for d = 1, D do
    local lim = tonumber(ARGV[H + k + d])
    if lim >= 0 and u[d] + cost[d] > lim then
      return {0, i, d - 1, unpack(used)}
    end
  end
end
local window_ms = tonumber(ARGV[5])
-- 0: the counter never expires (the all-time spend)
local ttl_ms = {2 * window_ms, 2 * window_ms, 0, 2 * 86400000, 32 * 86400000, 2 * 86400000, 32 * 86400000, 0}
for i = 0, n - 1 do
  local k = i * D
  for d = 1, D do
    if tonumber(ARGV[H + k + d]) >= 0 then
      local key = KEYS[k + d]
      if d == 3 then
        for j = 1, requests do redis.call('ZADD', key, ARGV[4], ARGV[members + j]) end
        redis.call('PEXPIRE', key, tonumber(ARGV[4]) - now)
      else
        if redis.call('INCRBY', key, cost[d]) == cost[d] and ttl_ms[d] > 0 then
          redis.call('PEXPIRE', key, ttl_ms[d])
        end
      end
    end
  end
end
return {1, unpack(used)}
"""

# KEYS: the admission's eight keys per subject. ARGV: token delta (used - reserved), spend delta, then the lease
# members.
SETTLE = """
local D = 8
local n = #KEYS / D
local deltas = {0, tonumber(ARGV[1]), 0, tonumber(ARGV[1]), tonumber(ARGV[1]),
                tonumber(ARGV[2]), tonumber(ARGV[2]), tonumber(ARGV[2])}
for i = 0, n - 1 do
  local k = i * D
  for j = 3, #ARGV do redis.call('ZREM', KEYS[k + 3], ARGV[j]) end
  for _, d in ipairs({2, 4, 5, 6, 7, 8}) do
    local key = KEYS[k + d]
    if deltas[d] ~= 0 and redis.call('EXISTS', key) == 1 then
      if redis.call('INCRBY', key, deltas[d]) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
    end
  end
end
return 1
"""

FailureMode = Literal["fail_closed", "fail_open"]


class RedisQuota(QuotaLimiter):
    """Counters in Redis under `prefix`, shared by every gateway process."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "raygate:q",
        failure_mode: FailureMode = "fail_closed",
        timeout_s: float = 0.25,
        window_s: float = 60.0,
        lease_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(window_s, lease_s, clock)
        import redis.asyncio as redis

        self.prefix = prefix
        self.failure_mode = failure_mode
        self._last_outage_log = float("-inf")
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._admit_script = self._client.register_script(ADMIT)
        self._settle_script = self._client.register_script(SETTLE)

    async def _admit(self, adm: Admission, check_seeded: bool = True) -> Admission:
        from redis.exceptions import RedisError

        keys: list[str] = []
        args: list[Any] = [
            int(adm.period.now * 1000), adm.reserve, adm.requests,
            int((adm.period.now + self.lease_s) * 1000), int(self.window_s * 1000), int(check_seeded), adm.spend,
        ]
        for s in adm.subjects:
            keys += adm.period.keys(s.id, self.prefix)
            args += [-1 if v is None else v for v in limit_values(s.limits)]
        args += lease_members(adm)
        try:
            res = await self._admit_script(keys=keys, args=args)
        except RedisError as exc:
            return self._unreachable(adm, exc)
        if res[0] == 2:
            raise Unseeded([adm.subjects[int(i)] for i in res[1:]])
        flat = [int(x) for x in (res[1:] if res[0] == 1 else res[3:])]
        d = len(DIMENSIONS)
        used = [tuple(flat[i : i + d]) for i in range(0, len(flat), d)]
        if res[0] != 1:
            raise rejection_error(reject(adm, used, int(res[1]), int(res[2])))
        adm.headers = rate_headers(adm.subjects, used, adm.reserve, adm.period, admitted=True, requests=adm.requests)
        return adm

    async def used(self, subject: Subject) -> tuple[int, ...]:
        now = self.clock()
        keys = Period(now, self.window_s).keys(subject.id, self.prefix)
        async with self._client.pipeline(transaction=True) as pipe:
            for d, key in enumerate(keys):
                if d == 2:
                    pipe.zcount(key, int(now * 1000) + 1, "+inf")
                else:
                    pipe.get(key)
            values = await pipe.execute()
        return tuple(int(v or 0) for v in values)

    async def _seed(self, subject: Subject, period: Period, used: tuple[int, ...]) -> None:
        from redis.exceptions import RedisError

        keys = period.keys(subject.id, self.prefix)
        limits = limit_values(subject.limits)
        ttls_s = (2 * 86400, 32 * 86400, 2 * 86400, 32 * 86400, None)  # BUDGETS' lifetimes; the all-time spend lasts
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for d, value, ttl_s in zip(BUDGETS, used, ttls_s, strict=True):
                    if limits[d] is not None:
                        pipe.set(keys[d], value, nx=True, px=None if ttl_s is None else ttl_s * 1000)
                await pipe.execute()
        except RedisError:
            pass  # the admission that follows meets the outage too, and the failure mode answers it

    async def _extend(self, held: list[Admission], expiry: float) -> None:
        expiry_ms = int(expiry * 1000)
        ttl_ms = max(1, int((expiry - self.clock()) * 1000))
        async with self._client.pipeline(transaction=False) as pipe:
            for adm in held:
                for s in adm.subjects:
                    if s.limits.max_concurrent is not None:
                        key = adm.period.keys(s.id, self.prefix)[2]
                        pipe.zadd(key, dict.fromkeys(lease_members(adm), expiry_ms), xx=True)  # only if still held
                        pipe.pexpire(key, ttl_ms, gt=True)
            await pipe.execute()

    async def _settle(self, adm: Admission, delta_tokens: int, delta_spend: int) -> None:
        from redis.exceptions import RedisError

        keys = [k for s in adm.subjects for k in adm.period.keys(s.id, self.prefix)]
        try:
            await self._settle_script(keys=keys, args=[delta_tokens, delta_spend, *lease_members(adm)])
        except RedisError as exc:
            # The lease expires by itself; token counters keep the reservation (never under-count).
            logger.warning("quota settle failed (lease %s): %s", adm.lease, exc)

    async def claim(self, name: str, ttl_s: float | None) -> bool:
        from redis.exceptions import RedisError

        try:
            return bool(await self._client.set(f"{self.prefix}:{name}", 1, nx=True,
                                               px=None if ttl_s is None else int(ttl_s * 1000)))
        except RedisError:
            return False

    def _unreachable(self, adm: Admission, exc: Exception) -> Admission:
        now = time.monotonic()
        if now - self._last_outage_log >= 10.0:  # once per 10 s, not once per request during an outage
            self._last_outage_log = now
            logger.warning("quota store unreachable (%s): %s (raygate_quota_unchecked_admissions_total and "
                           "raygate_quota_rejections_total{kind=\"unavailable\"} count the requests)",
                           self.failure_mode, exc)
        if self.failure_mode == "fail_open":
            self.fail_open_admissions += 1
            adm.unchecked = True
            return adm
        raise QuotaUnavailable("The quota service is unavailable; retry shortly.") from exc

    async def close(self) -> None:
        await super().close()
        await self._client.aclose()
