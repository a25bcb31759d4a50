"""Quota limits of a key or a team: what is allowed per window, at once, and per period."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_LIMIT = 10**15  # beyond any real budget; keeps every counter inside Redis's and JSON's 64-bit integers


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

    def is_unlimited(self) -> bool:
        return all(v is None for v in self.model_dump().values())
