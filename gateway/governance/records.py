"""What the gateway knows about a caller and a finished request (plain data)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, overload

from pydantic import BaseModel, ConfigDict, Field

from gateway.governance.limits import Limits
from serve.engine import Endpoint


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(dt: datetime) -> datetime: ...
@overload
def as_utc(dt: datetime | None) -> datetime | None: ...
def as_utc(dt: datetime | None) -> datetime | None:
    """`dt` in UTC: a naive one is taken as UTC, an aware one converted (SQLite keeps no offset: a `+05:00`
    stored as it is would read back five hours late)."""
    if dt is None:
        return None
    try:
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before year 1 in UTC: a validation error, not a crash
        raise ValueError(f"{dt.isoformat()} is outside the calendar once in UTC") from None


class KeyRecord(BaseModel):
    """An API key as stored, without its plaintext (the store never has it)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Stable key id (`key_...`), used in admin calls and the ledger.")
    name: str = Field(default="", description="Human label.")
    prefix: str = Field(description="First characters of the key, to tell keys apart.")
    owner: str | None = Field(default=None, description="Owner (a person or service).")
    team: str | None = Field(default=None, description="Team whose shared limits also apply.")
    tier: str = Field(default="default", description="Service tier; mapped to engine priority.")
    allowed_models: list[str] | None = Field(default=None, description="Model ids or aliases it may call; None: all.")
    allowed_endpoints: list[Endpoint] | None = Field(
        default=None, description="Endpoints it may call (chat, completion, responses, messages, embeddings, tokenize, detokenize); None: all.")
    limits: Limits = Field(default_factory=Limits, description="The key's own limits.")
    team_limits: Limits | None = Field(default=None, description="The team's limits, when it has a team.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form labels.")
    created_at: datetime = Field(default_factory=utcnow, description="Creation time (UTC).")
    expires_at: datetime | None = Field(default=None, description="After this the key is refused.")
    revoked_at: datetime | None = Field(default=None, description="When it was revoked, if it was.")

    def usable(self, now: datetime | None = None) -> bool:
        now = now or utcnow()
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def may_call(self, endpoint: Endpoint) -> bool:
        """Whether the endpoint is on the key's endpoint allow-list (no list: every endpoint)."""
        return self.allowed_endpoints is None or endpoint in self.allowed_endpoints

    def may_use(self, *models: str) -> bool:
        """Whether any of the names a request's model goes by is on the allow-list."""
        return self.allowed_models is None or any(m in self.allowed_models for m in models if m)


class UsageRow(BaseModel):
    """One finished request, as the ledger stores it."""

    request_id: str
    key_id: str | None
    team: str | None = None
    model: str
    version: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, read from the engine's prefix cache
    completion_tokens: int = 0
    cost: int = 0  # nano-units of the gateway's currency (gateway.governance.pricing)
    end_user: str | None = None  # the caller's own user id, as it sent it (bounded)
    latency_ms: float = 0.0
    status: int = 200
    finish_reason: str | None = None
    endpoint: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
