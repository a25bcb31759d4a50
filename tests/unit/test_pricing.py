"""Prices, costs and budget alert thresholds: the pure arithmetic behind spend."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.governance.alerts import reached
from gateway.governance.gate import Outcome
from gateway.governance.limits import Limits
from gateway.governance.pricing import FREE, ModelPrice, PriceBook, TokenPrice, from_nanos, to_nanos
from gateway.governance.quota_policy import limit_values
from gateway.streaming import fill_usage


def test_amounts_are_exact_in_nano_units() -> None:
    assert to_nanos(0.1) == 100_000_000 and to_nanos(1.93) == 1_930_000_000
    assert from_nanos(10 * 187_000_000) == 1.87
    assert ModelPrice(input=0.15, output=0.6).per_token() == TokenPrice(150, 150, 600)  # $0.15/M: 150 nanos a token
    assert ModelPrice(input=3, cached_input=0.3, output=15).per_token() == TokenPrice(3000, 300, 15000)
    with pytest.raises(ValidationError):
        ModelPrice(input=0.0001, output=1)  # finer than a nano-unit a token
    with pytest.raises(ValidationError):
        Limits(spend_per_day=0.0000000001)


def test_cost_prices_cached_prompt_tokens_apart_and_the_reservation_bounds_it() -> None:
    price = TokenPrice(input=3000, cached_input=300, output=15000)
    assert price.cost(1000, 0, 100) == 1000 * 3000 + 100 * 15000
    assert price.cost(1000, 768, 100) == 232 * 3000 + 768 * 300 + 100 * 15000
    assert price.cost(10, 50, 0) == 10 * 300  # cached never exceeds the prompt
    for cached in (0, 500, 1000):
        assert price.cost(1000, cached, 100) <= price.most(1000, 100)
    odd = TokenPrice(input=100, cached_input=200, output=1)  # a cached price above the input price still bounds
    assert odd.cost(10, 10, 0) <= odd.most(10, 0)


def test_price_lookup_version_then_model_then_any_and_the_ceiling_over_targets() -> None:
    book = PriceBook({
        "tiny": ModelPrice(input=1, output=2),
        "tiny@3": ModelPrice(input=5, output=9),
        "big": ModelPrice(input=2, output=1),
        "*": ModelPrice(input=0.5, output=0.5),
    })
    assert book.price("tiny@3", "tiny") == TokenPrice(5000, 5000, 9000)
    assert book.price("tiny@2", "tiny") == TokenPrice(1000, 1000, 2000)
    assert book.price("other@1", "other") == TokenPrice(500, 500, 500)
    assert PriceBook({}).price("x") == FREE and not PriceBook({})
    # A request for tiny may run on version 3 (a canary): reserved at its dearest version; a route over tiny and
    # big at the higher of each rate.
    assert book.ceiling(["tiny"]) == TokenPrice(5000, 5000, 9000)
    assert book.ceiling(["big", "tiny@2"]).input == 5000


def test_usage_reads_vllms_cached_prompt_tokens() -> None:
    outcome = Outcome()
    fill_usage({"prompt_tokens": 300, "completion_tokens": 8, "prompt_tokens_details": {"cached_tokens": 256}},
               outcome)
    assert (outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens) == (300, 256, 8)
    fill_usage({"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": None}, outcome)
    assert outcome.cached_tokens == 0


def test_alert_thresholds_reached() -> None:
    limits = limit_values(Limits(tokens_per_day=100, spend_per_day=1.0))
    used = (0, 0, 0, 79, 0, 800_000_000, 0, 0)
    assert reached(limits, used, [0.8, 1.0]) == [(5, 0.8)]
    assert reached(limits, (0, 0, 0, 100, 0, 1_000_000_000, 0, 0), [0.8, 1.0]) == [
        (3, 0.8), (3, 1.0), (5, 0.8), (5, 1.0)]
