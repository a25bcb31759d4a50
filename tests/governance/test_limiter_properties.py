"""A hypothesis state machine for both quota limiters: random admissions and settlements against a model.

The model is the policy in arithmetic: an admission fits when, for every subject (a key and its team)
and every dimension with a limit, what is used plus what it costs stays within the limit. Each step
checks the limiter agrees exactly (admits what fits, refuses what does not); at every step what it
reports as used equals the model's; when every admission has settled, nothing is in flight.
Redis runs against a private redis-server (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.errors import QuotaExceeded
from gateway.governance.limits import Limits
from gateway.governance.quota import LocalQuota, QuotaLimiter
from gateway.governance.quota_policy import (
    DIMENSIONS,
    SPEND_COUNTERS,
    TOKEN_COUNTERS,
    Admission,
    Subject,
    costs,
    limit_values,
)
from gateway.governance.quota_redis import RedisQuota

NOW = 1_000_000_020.0  # 20 s into a minute window, mid-day: every step falls in the same periods

limits_st = st.builds(
    Limits,
    rpm=st.none() | st.integers(0, 12),
    tpm=st.none() | st.integers(0, 400),
    max_concurrent=st.none() | st.integers(0, 5),
    tokens_per_day=st.none() | st.integers(0, 600),
    tokens_per_month=st.none() | st.integers(0, 800),
    # in thousandths of the currency: 10**6 nano-units each, the unit admissions spend in below
    spend_per_day=st.none() | st.integers(0, 600).map(lambda n: n / 1000),
    spend_per_month=st.none() | st.integers(0, 800).map(lambda n: n / 1000),
    spend_total=st.none() | st.integers(0, 1000).map(lambda n: n / 1000),
)
MILLI = 10**6  # nano-units in a thousandth
DIMS = len(DIMENSIONS)


@dataclass
class Model:
    """What each subject has used in each of the DIMENSIONS (counters exist once touched)."""

    subjects: list[Subject]
    used: dict[str, list[int]] = field(default_factory=dict)

    def fits(self, reserve: int, requests: int, spend: int) -> bool:
        for s in self.subjects:
            u = self.used.get(s.id, [0] * DIMS)
            for lim, have, cost in zip(limit_values(s.limits), u, costs(reserve, requests, spend)):
                if lim is not None and have + cost > lim:
                    return False
        return True

    def admit(self, reserve: int, requests: int, spend: int) -> None:
        for s in self.subjects:
            u = self.used.setdefault(s.id, [0] * DIMS)
            for d, (lim, cost) in enumerate(zip(limit_values(s.limits), costs(reserve, requests, spend))):
                if lim is not None:
                    u[d] += cost

    def settle(self, adm: Admission, used_tokens: int, used_spend: int) -> None:
        for s in self.subjects:
            u = self.used[s.id]
            lims = limit_values(s.limits)
            if lims[2] is not None:
                u[2] -= adm.requests
            for dims, delta in ((TOKEN_COUNTERS, used_tokens - adm.reserve), (SPEND_COUNTERS, used_spend - adm.spend)):
                for d in dims:
                    if lims[d] is not None:
                        u[d] = max(0, u[d] + delta)


class LimiterMachine(RuleBasedStateMachine):
    make_limiter: staticmethod  # set per store

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.limiter: QuotaLimiter = self.make_limiter()
        self.open: list[Admission] = []
        self.model: Model | None = None

    def run(self, coro):  # noqa: ANN001, ANN201
        return self.loop.run_until_complete(coro)

    @initialize(key=limits_st, team=st.none() | limits_st)
    def subjects(self, key: Limits, team: Limits | None) -> None:
        tag = uuid.uuid4().hex  # Redis outlives each example: fresh subjects every time
        subjects = [Subject(f"key:{tag}", key)] + ([Subject(f"team:{tag}", team)] if team else [])
        self.model = Model([s for s in subjects if not s.limits.is_unlimited()] or subjects[:1])

    @rule(reserve=st.integers(0, 150), requests=st.integers(1, 3), spend=st.integers(0, 150).map(lambda n: n * MILLI))
    def admit(self, reserve: int, requests: int, spend: int) -> None:
        assert self.model is not None
        fits = self.model.fits(reserve, requests, spend)
        try:
            adm = self.run(self.limiter.admit(self.model.subjects, reserve, requests, spend))
        except QuotaExceeded:
            assert not fits, "refused an admission that fits every limit"
            return
        assert fits, "admitted past a limit"
        self.model.admit(reserve, requests, spend)
        self.open.append(adm)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        assert self.model is not None
        adm = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        used = data.draw(st.integers(0, adm.reserve + 20))  # an estimate may under-count: more than reserved
        spent = data.draw(st.integers(0, adm.spend + 20 * MILLI))
        self.run(self.limiter.settle(adm, used, spent))
        self.model.settle(adm, used, spent)
        self.run(self.limiter.settle(adm, used, spent))  # settling twice changes nothing

    @invariant()
    def counters_agree(self) -> None:
        if self.model is None:
            return
        for s in self.model.subjects:
            actual = self.run(self.limiter.used(s))
            expected = self.model.used.get(s.id, [0] * DIMS)
            lims = limit_values(s.limits)
            assert [a for a, lim in zip(actual, lims) if lim is not None] == [
                e for e, lim in zip(expected, lims) if lim is not None]

    def teardown(self) -> None:
        try:
            for adm in self.open:
                self.run(self.limiter.settle(adm, adm.reserve, adm.spend))
            if self.model is not None:
                for s in self.model.subjects:
                    assert self.run(self.limiter.used(s))[2] == 0, "a concurrency slot outlived every settlement"
        finally:
            self.run(self.limiter.close())
            self.loop.close()


@pytest.mark.parametrize("store", ["local", "redis"])
def test_limiters_admit_exactly_what_fits_and_give_every_slot_back(store: str, redis_url: str) -> None:
    class Machine(LimiterMachine):
        make_limiter = staticmethod(
            (lambda: LocalQuota(clock=lambda: NOW)) if store == "local"
            else (lambda: RedisQuota(redis_url, clock=lambda: NOW, timeout_s=5.0))
        )

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=60 if store == "local" else 30, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ))
