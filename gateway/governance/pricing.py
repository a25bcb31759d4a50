"""Prices and what a request costs (pure).

Amounts are integers of nano-units of the gateway's currency (10⁻⁹ of a dollar, a euro...): a price per
million tokens with up to three decimals is a whole number of nano-units a token, so every cost, sum and
budget is exact integer arithmetic, in SQL and in Redis alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NANOS = 10**9  # nano-units in one unit of the currency
MAX_PRICE = 10**6  # per million tokens: beyond any real price, keeps a request's cost far inside 64 bits
ANY_MODEL = "*"  # the price key of every model without a price of its own


def to_nanos(amount: float | Decimal) -> int:
    """An amount of the currency in nano-units (its decimal form, so 0.1 is exactly 100,000,000)."""
    return int((Decimal(str(amount)) * NANOS).to_integral_value())


def from_nanos(nanos: int) -> float:
    """Nano-units as an amount of the currency (for JSON and CSV; sums are kept in nano-units)."""
    return float(Decimal(nanos) / NANOS)


def _per_token(price: float) -> int:
    return int(Decimal(str(price)) * 1000)  # a million tokens at `price` = 1000 nano-units a token per unit


class ModelPrice(BaseModel):
    """What a million tokens of a model cost, in the gateway's `currency`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, le=MAX_PRICE, description="Price of a million prompt (input) tokens.")
    cached_input: float | None = Field(
        default=None, ge=0, le=MAX_PRICE,
        description="Price of a million prompt tokens the engine found in its prefix cache (vLLM's "
        "`cached_tokens`); None: the input price. Set it lower to pass prefix-cache savings on to callers.",
    )
    output: float = Field(ge=0, le=MAX_PRICE, description="Price of a million generated (output) tokens.")

    @field_validator("input", "cached_input", "output")
    @classmethod
    def _three_decimals(cls, v: float | None) -> float | None:
        if v is not None and Decimal(str(v)) * 1000 % 1:
            raise ValueError("a price per million tokens has at most three decimals (a billionth a token)")
        return v

    def per_token(self) -> TokenPrice:
        cached = self.input if self.cached_input is None else self.cached_input
        return TokenPrice(_per_token(self.input), _per_token(cached), _per_token(self.output))


@dataclass(frozen=True)
class TokenPrice:
    """Nano-units a token: a prompt token, a cached prompt token, a generated token."""

    input: int = 0
    cached_input: int = 0
    output: int = 0

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """What a finished request costs: cached prompt tokens at their price, the rest of the prompt at the input
        price, the generated tokens at the output price."""
        cached = max(0, min(cached_tokens, prompt_tokens))
        return (prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output

    def most(self, prompt_tokens: int, new_tokens: int) -> int:
        """The most a request may cost before it runs (its reservation): no prompt token assumed cached."""
        return prompt_tokens * max(self.input, self.cached_input) + new_tokens * self.output

    def ceiling(self, other: TokenPrice) -> TokenPrice:
        """Each of the two prices' higher rate: what a request that may run on either is reserved at."""
        return TokenPrice(max(self.input, other.input), max(self.cached_input, other.cached_input),
                          max(self.output, other.output))


FREE = TokenPrice()


class PriceBook:
    """The configured prices by model name, alias or version (`name@version`); `*` prices every other model."""

    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        self._prices = {name: price.per_token() for name, price in prices.items()}
        # Every version priced apart from its model, by model name: a request is reserved at its dearest.
        self._versions: dict[str, list[TokenPrice]] = {}
        for name, price in self._prices.items():
            base, at, _ = name.rpartition("@")
            if at and base:
                self._versions.setdefault(base, []).append(price)

    def __bool__(self) -> bool:
        return bool(self._prices)

    def price(self, *names: str | None) -> TokenPrice:
        """The price of the first of `names` (most specific first: the version served, then the model) that has
        one, else `*`'s, else free."""
        for name in names:
            if name and name in self._prices:
                return self._prices[name]
        return self._prices.get(ANY_MODEL, FREE)

    def ceiling(self, names: Iterable[str | None]) -> TokenPrice:
        """The highest rates a request may be charged at when it may run on any of `names` (route targets, their
        served ids and versions): each name's price and every priced version of it."""
        top = FREE
        for name in names:
            if not name:
                continue
            base = name.rpartition("@")[0] or name
            for price in (self.price(name), self.price(base), *self._versions.get(base, ())):
                top = top.ceiling(price)
        return top
