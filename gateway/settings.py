"""Gateway settings, from the environment (`RAYGATE_*`) or passed in."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.governance.pricing import ModelPrice
from gateway.routing.routes import RouteConfig


def default_home() -> Path:
    return Path("~/.raygate").expanduser()


class GatewaySettings(BaseSettings):
    """How the gateway authenticates and bounds requests."""

    model_config = SettingsConfigDict(env_prefix="RAYGATE_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="State directory (registry, dev key).")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Bootstrap keys accepted without the key store (no limits)."
    )
    api_keys_file: Path | None = Field(
        default=None, description="File with one bootstrap key per line; read at start."
    )
    admin_key: SecretStr | None = Field(
        default=None, description="Key for /admin/*; user keys never pass there. None: admin API off."
    )
    admin_key_file: Path | None = Field(default=None, description="File holding the admin key (alternative to admin_key).")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of keys and usage; None: SQLite in `home`. PostgreSQL: postgresql+psycopg://..."
    )
    key_secret: SecretStr | None = Field(
        default=None,
        description="HMAC secret keys are hashed with. None: read or create `home`/secret (SQLite only; "
        "a shared database needs the same secret everywhere, so it must be set).",
    )
    key_cache_ttl_s: float = Field(
        default=0.5, gt=0, le=1.0, description="How long a key lookup is cached; a revocation reaches every process within it."
    )
    redis_url: str | None = Field(
        default=None, description="Redis for quotas shared by gateway processes; None: in-process (one process only)."
    )
    quota_failure_mode: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed", description="Redis unreachable: refuse with 503 (fail_closed) or admit and count (fail_open)."
    )
    quota_timeout_s: float = Field(default=0.25, gt=0, description="Longest a quota call to Redis may take before quota_failure_mode applies; raise it for a distant Redis.")
    rate_window_s: float = Field(default=60.0, gt=0, description="Window of the per-minute limits (rpm, tpm); shorten it only for tests.")
    concurrency_lease_s: float = Field(
        default=60.0, gt=0, description="A concurrency slot held by a process that died (a killed replica) frees "
        "itself within this; a running request renews its slot every third of it, however long it runs. Shorter "
        "frees a dead replica's slots sooner for one more quota-store write per request and third."
    )
    prompt_token_count: Literal["estimate", "engine"] = Field(
        default="estimate",
        description="How a request's prompt is counted for the token reservation of keys with token limits: "
        "`estimate` (4 bytes a token, no tokenizer on the request path) or `engine` (the engine renders the chat "
        "template and tokenizes, exact but paid twice per request). Either way the reservation settles to the "
        "engine's real count when the request ends.",
    )
    currency: str = Field(
        default="USD", min_length=1, max_length=8,
        description="The currency `prices` and spend budgets are in; a label for the admin API, the console and CSV.",
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description="Prices per million tokens by model: a served name, an alias, a version (`name@3`, over its "
        "model's price) or `*` (every model without one). Each request's cost is written to the ledger and counted "
        "against spend budgets; a model without a price costs nothing.",
    )
    budget_alert_webhook: str | None = Field(
        default=None,
        description="URL that gets a JSON POST when a key's or team's budget (tokens or spend, per day, month or in "
        "all) reaches one of `budget_alert_thresholds`, once per budget, period and threshold; None: no alerts.",
    )
    budget_alert_secret: SecretStr | None = Field(
        default=None,
        description="Signs each alert: `x-raygate-signature: sha256=<HMAC-SHA256 of the body>`, so the receiver can "
        "tell the gateway's posts from anyone's. Set it wherever the webhook's URL is reachable by others.",
    )
    budget_alert_thresholds: list[float] = Field(
        default_factory=lambda: [0.8, 1.0],
        description="Shares of a budget whose crossing sends an alert to `budget_alert_webhook`.",
    )
    ledger_flush_interval_s: float = Field(default=1.0, gt=0, description="How often usage rows are written in one batch; longer writes fewer, larger batches.")
    routes: dict[str, RouteConfig] = Field(
        default_factory=dict, description="Names clients may send as `model` that split or fall back across models."
    )
    max_route_attempts: int = Field(default=2, ge=1, description="Targets tried per request before giving up.")
    tier_priority: dict[str, int] = Field(
        default_factory=lambda: {"premium": -10, "default": 0, "batch": 10},
        description="Key tier -> vLLM request priority (lower first); used where the engine schedules by priority.",
    )
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above it); raise it for very long prompts.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="Longest a non-streaming request may take before a 504 (the engine request is aborted); streams are not bounded.")
    metrics: bool = Field(default=True, description="Serve Prometheus metrics on /metrics.")
    metrics_auth: Literal["admin", "open"] = Field(
        default="admin",
        description="Who may read /metrics: `admin` asks for the admin key as a bearer token (Prometheus sends it "
        "with `authorization: {credentials_file: ...}`); `open` answers anyone who reaches the port, for a gateway "
        "only Prometheus can reach.",
    )
    metrics_key_ids: list[str] = Field(
        default_factory=list,
        description="Key ids whose SLO attainment gets series of their own in raygate_slo_requests_total; every "
        "other key counts under key=\"other\". List the keys you report SLOs for: each adds two series.",
    )
    tracing: str | None = Field(
        default=None,
        description="Trace exporters ('otlp', 'console', comma-separated, or 'none'); None: OTEL_TRACES_EXPORTER, "
        "unset means off. The OTLP exporter takes the standard OTEL_EXPORTER_OTLP_* variables.",
    )
    access_log: bool = Field(
        default=False, description="One JSON line per request (status, model, key id, tokens, times; never the key "
        "or the prompt), written from a thread of its own."
    )
    console: bool = Field(
        default=True, description="Serve the admin console at /ui (behind the admin key; off without one)."
    )
    console_session_s: float = Field(
        default=8 * 3600, gt=0, le=30 * 86400,
        description="How long a console login lasts; shorten it where browsers are shared.",
    )
    slo_ttft_s: float = Field(default=1.0, gt=0, description="Time-to-first-token objective that raygate_slo_requests_total counts against; set your service's.")
    slo_tpot_s: float = Field(default=0.1, gt=0, description="Mean time-per-output-token objective that raygate_slo_requests_total counts against; set your service's.")

    def accepted_keys(self) -> list[str]:
        """The bootstrap keys: `api_keys` plus the lines of `api_keys_file`."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines() if line.strip()]
        return keys

    def admin_secret(self) -> str | None:
        if self.admin_key is not None:
            return self.admin_key.get_secret_value()
        if self.admin_key_file is not None:
            return self.admin_key_file.read_text().strip() or None
        return None

    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'raygate.db'}"

    def hmac_secret(self) -> bytes:
        """The key-hashing secret: set, or kept in `home`/secret (created once, mode 0600)."""
        if self.key_secret is not None:
            return self.key_secret.get_secret_value().encode()
        path = self.home / "secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip().encode()

    @model_validator(mode="after")
    def _shared_db_needs_secret(self) -> GatewaySettings:
        if self.database_url and not self.database_url.startswith("sqlite") and self.key_secret is None:
            raise ValueError("a shared database_url needs key_secret (RAYGATE_KEY_SECRET), the same on every gateway")
        for name, route in self.routes.items():
            if any(t.model == name for t in route.targets):
                raise ValueError(f"route {name!r} points at itself")
        return self

    @field_validator("budget_alert_thresholds")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if any(not 0 < t <= 1 for t in v):
            raise ValueError("alert thresholds are shares of a budget, in (0, 1]")
        return sorted(set(v))

    @field_validator("home", "api_keys_file", "admin_key_file", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @field_validator("api_keys", "admin_key")
    @classmethod
    def _nonempty(cls, v: list[SecretStr] | SecretStr | None) -> list[SecretStr] | SecretStr | None:
        for key in v if isinstance(v, list) else [v] if v is not None else []:
            if len(key.get_secret_value()) < 16:
                raise ValueError("API keys must be at least 16 characters")
        return v
