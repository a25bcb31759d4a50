"""The governance a request passes through: who is calling, may they, is there quota, and the ledger.

Built once per gateway process by `Governance.build(settings)`; routes use it through
`authenticate`, `authorize`, `admit` and `finish`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.requests import Request

from gateway.errors import AuthenticationFailed, BudgetExhausted, EndpointNotAllowed
from gateway.governance.alerts import BudgetAlerts
from gateway.governance.keycache import KeyCache
from gateway.governance.keys import hash_key, key_prefix
from gateway.governance.ledger import UsageLedger
from gateway.governance.pricing import PriceBook, TokenPrice
from gateway.governance.quota import LocalQuota, QuotaLimiter
from gateway.governance.quota_policy import Admission, Demand, Period, Subject, reservation
from gateway.governance.records import KeyRecord, UsageRow
from gateway.governance.store import KeyStore, open_store, reachable
from gateway.settings import GatewaySettings
from serve.engine import Endpoint
from serve.errors import ModelNotFound

logger = logging.getLogger(__name__)

_URL_KEY_PARAMS = ("api_key", "api-key", "key", "access_token")
_INVALID = "Incorrect API key provided."


def bearer_token(request: Request) -> str:
    """The key a request carries: `Authorization: Bearer` (OpenAI's clients), else `x-api-key` (Anthropic's);
    keys in the URL are refused outright."""
    if request.scope.get("query_string") and any(p in request.query_params for p in _URL_KEY_PARAMS):
        raise AuthenticationFailed("API keys must be sent in the Authorization header, never in the URL.")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if not token:
        token = request.headers.get("x-api-key", "").strip()
    if not token:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'.",
            code="missing_api_key",
        )
    return token


@dataclass
class Outcome:
    """How a request ended, for the quota settlement and the ledger."""

    status: int = 200
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, found in the engine's prefix cache (vLLM's cached_tokens)
    completion_tokens: int = 0
    finish_reason: str | None = None
    version: str | None = None
    model: str | None = None
    endpoint: str | None = None
    usage_seen: bool = False  # the engine reported usage (a full body, or a stream's usage event)
    events: int = 0  # stream events with choices relayed so far (what the client was sent)
    served: str | None = None  # the model id that answered (a route's target, an alias's model)
    end_user: str | None = None  # the caller's own user id (OpenAI's `user`, Anthropic's metadata.user_id)


class Governance:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        secret: bytes,
        store: KeyStore | None,
        limiter: QuotaLimiter,
        ledger: UsageLedger | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.ledger = ledger
        self.prices = PriceBook(settings.prices)
        alert_secret = settings.budget_alert_secret.get_secret_value().encode() if settings.budget_alert_secret else None
        self.alerts = BudgetAlerts(settings.budget_alert_webhook, settings.budget_alert_thresholds, limiter,
                                   settings.currency, alert_secret) if settings.budget_alert_webhook else None
        self._secret = secret  # the store's too: both hash with it
        static = {}
        for key in settings.accepted_keys():
            h = hash_key(secret, key)
            static[h] = KeyRecord(id=f"static:{key_prefix(key)}", name="bootstrap", prefix=key_prefix(key))
        self.keys = KeyCache(store, self.hash, static=static, ttl_s=settings.key_cache_ttl_s)
        admin = settings.admin_secret()
        self._admin_hash = hash_key(secret, admin) if admin else None
        if store is not None:
            limiter.budgets = self.budget_used  # day and month budgets survive restarts

    @classmethod
    def build(cls, settings: GatewaySettings) -> Governance:
        """The governance for `settings`: SQL store + ledger, Redis or in-process quotas."""
        secret = settings.hmac_secret()
        store = open_store(settings.db_url(), secret)
        limiter: QuotaLimiter
        if settings.redis_url:
            from gateway.governance.quota_redis import RedisQuota

            limiter = RedisQuota(
                settings.redis_url, failure_mode=settings.quota_failure_mode, timeout_s=settings.quota_timeout_s,
                window_s=settings.rate_window_s, lease_s=settings.concurrency_lease_s,
            )
        else:
            limiter = LocalQuota(window_s=settings.rate_window_s, lease_s=settings.concurrency_lease_s)
        ledger = UsageLedger(store, flush_interval_s=settings.ledger_flush_interval_s)
        return cls(settings, secret=secret, store=store, limiter=limiter, ledger=ledger)

    def hash(self, key: str) -> str:
        return hash_key(self._secret, key)

    def session_key(self, purpose: str) -> bytes:
        """A signing key for `purpose` (the console's cookies), from the server secret and the admin key: a new
        admin key or secret voids what it signed."""
        return hmac.new(self._secret, f"{purpose}:{self._admin_hash or ''}".encode(), "sha256").digest()

    async def close(self) -> None:
        if self.ledger is not None:
            await self.ledger.close()
        if self.alerts is not None:
            await self.alerts.close()
        await self.limiter.close()
        if self.store is not None:
            self.store.close()

    # -- who ------------------------------------------------------------------
    async def authenticate(self, request: Request) -> KeyRecord:
        key_hash = self.hash(bearer_token(request))
        record = await self.keys.get(key_hash)
        if record is None or not record.usable():
            raise AuthenticationFailed(_INVALID)  # unknown, revoked and expired look the same
        return record

    @property
    def has_admin(self) -> bool:
        """Whether an admin key is set (without one, /admin and the console stay shut)."""
        return self._admin_hash is not None

    def is_admin_key(self, token: str) -> bool:
        """Whether `token` is the admin key (compared as HMACs, in constant time)."""
        return self._admin_hash is not None and hmac.compare_digest(self.hash(token), self._admin_hash)

    def authenticate_admin(self, request: Request) -> None:
        if not self.is_admin_key(bearer_token(request)):
            raise AuthenticationFailed(_INVALID)

    @staticmethod
    def authorize(
        record: KeyRecord, requested: str, targets: list[str], names: Callable[[str], tuple[str, ...]],
        route: bool,
    ) -> list[str]:
        """The targets of a request `record` may use, in order (pure); ModelNotFound if none.

        A route on the key's list grants the targets and fallbacks its config names; otherwise each
        target must be on the list by one of its `names` (so a route's canary or fallback never takes a
        key where it may not go). A model the key may not use looks exactly like one that does not exist.
        """
        if record.allowed_models is None or (route and record.may_use(requested)):
            return targets
        allowed = [t for t in targets if record.may_use(*names(t))]
        if not allowed:
            raise ModelNotFound(requested)
        return allowed

    # -- how much -------------------------------------------------------------
    async def budget_used(self, subject: Subject, period: Period) -> tuple[int, ...]:
        """What the ledger says `subject` used of each budget (tokens on the period's day and in its month, spend
        on the day, in the month and in all) , this process's pending rows written first."""
        assert self.store is not None
        kind, _, name = subject.id.partition(":")
        with reachable():
            if self.ledger is not None:
                await self.ledger.flush()
            return await asyncio.to_thread(
                self.store.budget_used, key_id=name if kind == "key" else None, team=name if kind == "team" else None,
                at=datetime.fromtimestamp(period.now, UTC),
            )

    @staticmethod
    def subjects(record: KeyRecord) -> list[Subject]:
        out = []
        if not record.limits.is_unlimited():
            out.append(Subject(f"key:{record.id}", record.limits))
        if record.team and record.team_limits is not None and not record.team_limits.is_unlimited():
            out.append(Subject(f"team:{record.team}", record.team_limits))
        return out

    async def admit(
        self, record: KeyRecord, demand_of: Callable[[], Demand], max_model_len: int | None,
        count_prompt: Callable[[], Awaitable[int | None]] | None = None, price: Callable[[], TokenPrice] | None = None,
    ) -> Admission:
        """Reserve the most the request can use: tokens, and where a spend budget applies its most possible cost
        at `price` (the dearest of the models it may run on). The request's demand (`demand_of`), the engine's
        exact prompt count (`count_prompt`) and the price are asked only when a limit applies: a key without
        limits pays for none of them. A batch counts one request a prompt for rpm and max_concurrent."""
        subjects = self.subjects(record)
        if not subjects:
            return await self.limiter.admit(subjects, 0)
        demand = demand_of()
        counted = await count_prompt() if count_prompt is not None else None
        reserve = reservation(demand, max_model_len, counted)
        spend = 0
        if price is not None and any(s.limits.has_spend() for s in subjects):
            prompt = demand.prompt_tokens if counted is None else counted
            spend = price().most(prompt, reserve - prompt)
        try:
            return await self.limiter.admit(subjects, reserve, demand.prompts, spend)
        except BudgetExhausted as exc:
            if self.alerts is not None:
                await self.alerts.check(subjects, refused=(exc.subject or "", exc.kind))
            raise

    async def authorize_endpoint(self, record: KeyRecord, endpoint: Endpoint) -> None:
        """EndpointNotAllowed (403) when the key's endpoint allow-list leaves `endpoint` out; the refusal counts
        one request against its rpm, as a refused model does."""
        if not record.may_call(endpoint):
            await self.count_request(record)
            raise EndpointNotAllowed(f"This key may not call the {endpoint} endpoint.")

    async def count_request(self, record: KeyRecord) -> None:
        """One request that generates nothing against the key's rpm (429 past it): a request refused for its
        model (probing for model names is not free), a token count."""
        subjects = self.subjects(record)
        if subjects:
            await self.limiter.settle(await self.limiter.admit(subjects, 0), 0)

    def cost(self, outcome: Outcome) -> int:
        """What the request cost in nano-units: its tokens at the price of the version that served it, else of the
        model that answered, else of the name it asked for."""
        if not self.prices:
            return 0  # no prices configured: every request is free, and no lookup on the request path
        price = self.prices.price(outcome.version, outcome.served, outcome.model)
        return price.cost(outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens)

    async def finish(
        self, record: KeyRecord, adm: Admission | None, outcome: Outcome, request_id: str, latency_s: float
    ) -> None:
        """Settle the reservation to real usage and cost, and queue the ledger row. Never raises."""
        cost = self.cost(outcome)
        try:
            if adm is not None:
                await self.limiter.settle(adm, outcome.prompt_tokens + outcome.completion_tokens, cost)
                if self.alerts is not None and not adm.unchecked:
                    await self.alerts.check(adm.subjects)
        except Exception:  # noqa: BLE001 - a settle failure must not fail the response
            logger.exception("quota settle failed for %s", request_id)
        if self.ledger is not None and outcome.model is not None:
            self.ledger.record(
                UsageRow(
                    request_id=request_id, key_id=record.id, team=record.team, model=outcome.model,
                    version=outcome.version, prompt_tokens=outcome.prompt_tokens,
                    cached_tokens=min(outcome.cached_tokens, outcome.prompt_tokens),
                    completion_tokens=outcome.completion_tokens, cost=cost, end_user=outcome.end_user,
                    latency_ms=latency_s * 1000.0, status=outcome.status, finish_reason=outcome.finish_reason,
                    endpoint=outcome.endpoint,
                )
            )
