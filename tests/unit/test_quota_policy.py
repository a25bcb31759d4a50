"""The pure quota and routing policies."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.governance.limits import Limits
from gateway.governance.quota_policy import (
    Demand,
    Period,
    Subject,
    first_exceeded,
    format_duration,
    limit_values,
    rate_headers,
    reservation,
    retry_after,
    unreported_usage,
)
from gateway.routing.routes import RouteConfig, pick, plan, priority_for


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.9999, "999ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_format_duration_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after(0.01) == 1 and retry_after(1.2) == 2 and retry_after(59) == 59


def test_period_windows_align_on_the_epoch() -> None:
    p = Period(now=125.5, window_s=60)
    assert p.window == 2 and p.window_reset_s == pytest.approx(54.5)
    assert Period(now=0, window_s=60).day == "19700101" and Period(now=0, window_s=60).month == "197001"
    assert Period(now=86399, window_s=60).day_reset_s() == 1
    assert Period(now=0, window_s=60).month_reset_s() == 31 * 86400
    keys = p.keys("key:k1", "q")
    assert keys[0] == "q:key:k1:rpm:2" and keys[3] == "q:key:k1:day:19700101"


def test_first_exceeded_checks_every_dimension_in_order() -> None:
    lim = limit_values(Limits(rpm=2, tpm=100, max_concurrent=1, tokens_per_day=1000))
    assert first_exceeded(lim, (0, 0, 0, 0, 0), 100) is None
    assert first_exceeded(lim, (2, 0, 0, 0, 0), 1) == 0  # requests
    assert first_exceeded(lim, (0, 1, 0, 0, 0), 100) == 1  # tokens: 1 + 100 > 100
    assert first_exceeded(lim, (0, 0, 1, 0, 0), 1) == 2  # concurrency
    assert first_exceeded(lim, (0, 0, 0, 950, 0), 51) == 3  # daily budget
    assert first_exceeded(limit_values(Limits()), (10**9,) * 5, 10**9) is None  # unlimited


def test_headers_report_the_tightest_subject() -> None:
    key = Subject("key:a", Limits(rpm=10, tpm=1000))
    team = Subject("team:t", Limits(rpm=5))
    h = rate_headers([key, team], [(3, 100, 0, 0, 0), (4, 0, 0, 0, 0)], 50, Period(30, 60), admitted=True)
    assert h["x-ratelimit-limit-requests"] == "5" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-limit-tokens"] == "1000" and h["x-ratelimit-remaining-tokens"] == "850"
    assert h["x-ratelimit-reset-requests"] == "30s"
    assert rate_headers([Subject("key:b", Limits(max_concurrent=1))], [(0,) * 5], 1, Period(0, 60), True) == {}


def test_reservation_is_the_prompts_plus_every_sequence_they_may_generate() -> None:
    assert reservation(Demand(16, n=2, max_new_tokens=16), 2048) == 16 + 2 * 16
    assert reservation(Demand(20, prompts=6, n=2, max_new_tokens=10), 2048) == 20 + 6 * 2 * 10
    assert reservation(Demand(20, max_new_tokens=10), 2048, prompt_tokens=7) == 7 + 10  # the engine's count
    # no max_tokens: each sequence may run to the end of the context, less its prompt
    assert reservation(Demand(4), 100) == 100
    assert reservation(Demand(30, prompts=2, n=3), 100) == 30 + 3 * (2 * 100 - 30)


def test_a_stream_cut_short_is_charged_what_was_sent() -> None:
    chat = Demand(16, max_new_tokens=100)
    # A chat stream opens with a role-only event per choice; the rest carried a token each.
    assert unreported_usage(chat, 1 + 7, opens_with_role=True) == (16, 7)
    assert unreported_usage(Demand(16, n=2, max_new_tokens=100), 2 + 6, opens_with_role=True) == (16, 6)
    assert unreported_usage(Demand(4, max_new_tokens=9), 5, opens_with_role=False) == (4, 5)
    # Nothing reached the client: the engine never answered, nothing is charged.
    assert unreported_usage(chat, 0, opens_with_role=True) == (0, 0)
    assert unreported_usage(chat, 1, opens_with_role=True) == (16, 0)


def test_canary_split_within_five_percent_over_2000_decisions() -> None:
    route = RouteConfig.model_validate(
        {"targets": [{"model": "m@1", "weight": 90}, {"model": "m@2", "weight": 10}], "fallbacks": ["other"]}
    )
    rng = random.Random(7)
    counts = Counter(pick(route, rng.random()) for _ in range(2000))
    assert abs(counts["m@2"] / 2000 - 0.10) <= 0.05  # within 5 points of its weight
    assert counts["m@1"] + counts["m@2"] == 2000 and counts["m@2"] > 0


def test_plan_orders_pick_then_others_then_fallbacks_bounded() -> None:
    route = RouteConfig.model_validate(
        {"targets": [{"model": "a", "weight": 1}, {"model": "b", "weight": 3}], "fallbacks": ["c", "a"]}
    )
    assert plan(route, 0.0, 5) == ["a", "b", "c"]
    assert plan(route, 0.9, 5) == ["b", "a", "c"]
    assert plan(route, 0.9, 1) == ["b"]
    zero = RouteConfig.model_validate({"targets": [{"model": "a", "weight": 0}, {"model": "b"}]})
    assert {pick(zero, u / 10) for u in range(10)} == {"b"}
    with pytest.raises(ValueError):
        RouteConfig.model_validate({"targets": [{"model": "a", "weight": 0}]})


def test_tier_priority() -> None:
    tiers = {"premium": -10, "batch": 10}
    assert priority_for("premium", tiers) == -10 and priority_for("unknown", tiers) == 0
