"""Quota limits of a key or a team: what is allowed per window, at once, and per period."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LIMIT = 10**15  # beyond any real budget; keeps every counter inside Redis's and JSON's 64-bit integers
MAX_SPEND = 10**9  # in the currency: its nano-units (gateway.governance.pricing) stay inside 64 bits too


class Limits(BaseModel):
    """Per-key or per-team limits; None means unlimited."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=0, le=MAX_LIMIT, description="Requests per rate window (a minute by default).")
    tpm: int | None = Field(
        default=None, ge=0, le=MAX_LIMIT, description="Tokens per rate window; prompt + max_tokens reserved at admission."
    )
    max_concurrent: int | None = Field(default=None, ge=0, le=MAX_LIMIT, description="Requests in flight at once.")
    tokens_per_day: int | None = Field(default=None, ge=0, le=MAX_LIMIT, description="Token budget per UTC day.")
    tokens_per_month: int | None = Field(default=None, ge=0, le=MAX_LIMIT, description="Token budget per UTC month.")
    spend_per_day: float | None = Field(
        default=None, ge=0, le=MAX_SPEND, description="Spend budget per UTC day in the gateway's currency (tokens at "
        "the gateway's `prices`); a request's most possible cost is reserved at admission."
    )
    spend_per_month: float | None = Field(default=None, ge=0, le=MAX_SPEND, description="Spend budget per UTC month.")
    spend_total: float | None = Field(default=None, ge=0, le=MAX_SPEND, description="Spend budget for all time.")

    @field_validator("spend_per_day", "spend_per_month", "spend_total")
    @classmethod
    def _nano_precision(cls, v: float | None) -> float | None:
        if v is not None and Decimal(str(v)) * 10**9 % 1:
            raise ValueError("a spend budget has at most nine decimals")
        return v

    def is_unlimited(self) -> bool:
        return all(v is None for v in self.model_dump().values())

    def has_spend(self) -> bool:
        """Whether any spend budget applies (the request's cost is then reserved)."""
        return any(v is not None for v in (self.spend_per_day, self.spend_per_month, self.spend_total))
