"""`/admin/*`: keys, teams and usage, for the admin key only (user keys never pass).

No `from __future__ import annotations` here: FastAPI must see the route-local `Store` dependency alias.
"""


import asyncio
import base64
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from gateway.errors import NotFound, QuotaUnavailable, ServiceDisabled
from gateway.governance import usage_report
from gateway.governance.gate import Governance
from gateway.governance.limits import Limits
from gateway.governance.records import KeyRecord, as_utc
from gateway.governance.store import USAGE_GROUPS, KeyNotFound, KeyStore, reachable
from serve.engine import Endpoint
from serve.errors import InvalidRequest

MAX_LIFETIME_S = 100 * 365 * 86400  # a key for a century is a key forever; beyond, datetimes overflow
MAX_PAGE = 1000
MAX_METADATA_BYTES = 16 * 1024


def storable_metadata(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """Labels that serialize as JSON within 64-bit integers and MAX_METADATA_BYTES (they are stored and shown)."""
    if v is None:
        return v
    try:
        size = len(orjson.dumps(v))
    except (TypeError, orjson.JSONEncodeError):
        raise ValueError("metadata must be plain JSON with integers within 64 bits") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    return v


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200, description="Human label.")
    owner: str | None = Field(default=None, max_length=200, description="Owner (person or service).")
    team: str | None = Field(default=None, max_length=200, description="Team whose limits also apply.")
    tier: str = Field(default="default", max_length=50, description="Service tier (engine priority).")
    allowed_models: list[str] | None = Field(default=None, description="Models or aliases it may call; null: all.")
    allowed_endpoints: list[Endpoint] | None = Field(
        default=None, description="Endpoints it may call (chat, completion, responses, messages, embeddings, tokenize, detokenize); null: all.")
    limits: Limits = Field(default_factory=Limits, description="The key's own limits.")
    expires_at: datetime | None = Field(
        default=None, description="Refused after this instant (an offset is honoured; without one, UTC)."
    )
    expires_in_s: float | None = Field(
        default=None, gt=0, le=MAX_LIFETIME_S, description="Alternative to expires_at: seconds from now."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form labels.")

    def expiry(self) -> datetime | None:
        if self.expires_in_s is not None:
            return datetime.now(UTC) + timedelta(seconds=self.expires_in_s)
        return self.expires_at

    _utc = field_validator("expires_at")(lambda v: as_utc(v))
    _labels = field_validator("metadata")(storable_metadata)


class KeyUpdate(BaseModel):
    """Only the fields sent change. `owner`, `team`, `allowed_models`, `allowed_endpoints` and `expires_at` may be
    set to null (none, no team, every model, every endpoint, never); `name`, `tier`, `limits` and `metadata` may
    not."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default=None, max_length=200, description="Human label.")  # type: ignore[assignment]
    owner: str | None = Field(default=None, max_length=200, description="Owner.")
    team: str | None = Field(default=None, max_length=200, description="Team.")
    tier: str = Field(default=None, max_length=50, description="Service tier.")  # type: ignore[assignment]
    allowed_models: list[str] | None = Field(default=None, description="Allowed models; send [] to allow none.")
    allowed_endpoints: list[Endpoint] | None = Field(default=None, description="Allowed endpoints; null: all.")
    limits: Limits = Field(default=None, description="Replaces the key's limits.")  # type: ignore[assignment]
    expires_at: datetime | None = Field(default=None, description="New expiry (an offset is honoured).")
    metadata: dict[str, Any] = Field(default=None, description="Replaces the labels.")  # type: ignore[arg-type]

    _utc = field_validator("expires_at")(lambda v: as_utc(v))
    _labels = field_validator("metadata")(storable_metadata)


class Rotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: float = Field(default=0.0, ge=0, le=30 * 86400, description="How long the old key keeps working.")


class TeamLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: Limits = Field(description="Limits shared by every key of the team.")


def _page(data: list[Any], limit: int, cursor: Any) -> dict[str, Any]:
    """OpenAI's list shape: `data`, `has_more`, and the cursor of the last item to pass as `after`."""
    more = len(data) > limit
    data = data[:limit]
    return {"object": "list", "data": data, "has_more": more, "last_id": cursor(data[-1]) if data else None}


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _key_view(record: KeyRecord) -> dict[str, Any]:
    return record.model_dump(mode="json")


def _usage_cursor(group: dict[str, Any], group_by: list[str]) -> str:
    """A group's place in the ordering, as an opaque `last_id` (values may hold any character)."""
    return base64.urlsafe_b64encode(orjson.dumps([group[g] or "" for g in group_by])).decode()


def _usage_after(after: str, group_by: list[str]) -> list[str]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(after.encode()))
    except (ValueError, orjson.JSONDecodeError):
        values = None
    if not isinstance(values, list) or len(values) != len(group_by) or not all(isinstance(v, str) for v in values):
        raise InvalidRequest("`after` is the `last_id` of a previous page grouped the same way.", param="after")
    return values


def _group_by(value: str) -> list[str]:
    groups = [g.strip() for g in value.split(",") if g.strip()]
    unknown = [g for g in groups if g not in USAGE_GROUPS]
    if not groups or unknown or len(set(groups)) != len(groups):
        raise InvalidRequest(f"`group_by` is a comma-separated list of distinct {', '.join(USAGE_GROUPS)}.",
                             param="group_by")
    return groups


Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Items per page.")]
Groups = Annotated[str, Query(description="Comma-separated columns to group by: " + ", ".join(USAGE_GROUPS) + ".")]


def admin_router(gov: Governance) -> APIRouter:
    async def admin(request: Request) -> KeyStore:
        gov.authenticate_admin(request)  # the app checked it before reading the body; this router may stand alone
        if gov.store is None:
            raise ServiceDisabled("This gateway runs without a key store.")
        return gov.store

    Store = Annotated[KeyStore, Depends(admin)]
    r = APIRouter(prefix="/admin", tags=["admin"])

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with reachable():
                return await asyncio.to_thread(fn, *args, **kwargs)
        except KeyNotFound as exc:
            raise NotFound(f"No API key with id '{exc.args[0]}'.", param="key_id") from None

    @r.post("/keys", status_code=201)
    async def create_key(spec: KeyCreate, store: Store) -> Response:
        record, plaintext = await call(
            store.create_key, name=spec.name, owner=spec.owner, team=spec.team, tier=spec.tier,
            allowed_models=spec.allowed_models, allowed_endpoints=spec.allowed_endpoints, limits=spec.limits, expires_at=spec.expiry(), metadata=spec.metadata,
        )
        return _json({"key": plaintext, **_key_view(record)}, 201)

    @r.get("/keys")
    async def list_keys(
        store: Store, include_revoked: bool = False, team: str | None = None, limit: Limit = 100,
        after: str | None = None,
    ) -> Response:
        records = await call(store.list_keys, include_revoked=include_revoked, team=team, limit=limit + 1, after=after)
        return _json(_page([_key_view(k) for k in records], limit, lambda k: k["id"]))

    @r.get("/keys/{key_id}")
    async def get_key(key_id: str, store: Store) -> Response:
        return _json(_key_view(await call(store.get_key, key_id)))

    @r.patch("/keys/{key_id}")
    async def update_key(key_id: str, spec: KeyUpdate, store: Store) -> Response:
        record = await call(store.update_key, key_id, **spec.model_dump(exclude_unset=True))
        gov.keys.invalidate()
        return _json(_key_view(record))

    @r.post("/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, store: Store, spec: Rotate | None = None) -> Response:
        record, plaintext = await call(store.rotate_key, key_id, grace_s=(spec or Rotate()).grace_s)
        gov.keys.invalidate()
        return _json({"key": plaintext, **_key_view(record)}, 201)

    @r.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, store: Store) -> Response:
        record = await call(store.revoke_key, key_id)
        gov.keys.invalidate()
        return _json(_key_view(record))

    @r.delete("/keys/{key_id}")
    async def delete_key(key_id: str, store: Store) -> Response:
        return await revoke_key(key_id, store)

    @r.put("/teams/{team}")
    async def set_team(team: str, spec: TeamLimits, store: Store) -> Response:
        await call(store.set_team, team, spec.limits)
        gov.keys.invalidate()
        return _json({"team": team, "limits": spec.limits.model_dump(exclude_none=True)})

    @r.get("/teams")
    async def list_teams(store: Store) -> Response:
        teams = await call(store.list_teams)
        return _json({"object": "list", "data": [{"team": n, "limits": lim.model_dump(exclude_none=True)}
                                                 for n, lim in teams.items()]})

    async def usage_rows(store: KeyStore, **query: Any) -> Any:
        if gov.ledger is not None:
            with reachable():
                await gov.ledger.flush()  # this process's pending rows first
        return await call(store.usage_summary, **query)

    @r.get("/usage")
    async def usage(
        store: Store, since: date | None = None, until: date | None = None, key_id: str | None = None,
        team: str | None = None, model: str | None = None, version: str | None = None, end_user: str | None = None,
        endpoint: Endpoint | None = None, group_by: Groups = "day,key_id,model", limit: Limit = 100,
        after: str | None = None,
    ) -> Response:
        groups = _group_by(group_by)
        where = {"key_id": key_id, "team": team, "model": model, "version": version, "end_user": end_user,
                 "endpoint": endpoint}
        rows = await usage_rows(store, group_by=groups, since=since, until=until, limit=limit + 1,
                                after=_usage_after(after, groups) if after else None, **where)
        totals = await call(store.usage_totals, since=since, until=until, **where)
        page = _page(rows, limit, lambda g: _usage_cursor(g, groups))
        return _json({**page, "group_by": groups, "currency": gov.settings.currency, "totals": totals})

    @r.get("/usage.csv")
    async def usage_csv(
        store: Store, since: date | None = None, until: date | None = None, key_id: str | None = None,
        team: str | None = None, model: str | None = None, version: str | None = None, end_user: str | None = None,
        endpoint: Endpoint | None = None, group_by: Groups = "day,key_id,model",
    ) -> Response:
        groups = _group_by(group_by)
        rows = await usage_rows(store, group_by=groups, since=since, until=until, key_id=key_id, team=team,
                                model=model, version=version, end_user=end_user, endpoint=endpoint)
        return Response(usage_report.usage_csv(rows, groups, gov.settings.currency),
                        media_type="text/csv; charset=utf-8", headers={"content-disposition": 'attachment; filename="raygate-usage.csv"'})

    @r.get("/keys/{key_id}/budget")
    async def key_budget(key_id: str, store: Store) -> Response:
        """The key's limits (and its team's) with what each has used now, from the live quota counters."""
        record: KeyRecord = await call(store.get_key, key_id)
        out: dict[str, Any] = {"key_id": record.id, "currency": gov.settings.currency}
        for subject in gov.subjects(record):
            try:
                used = await gov.limiter.used(subject)
            except Exception as exc:  # noqa: BLE001 - the quota store's own errors (Redis down)
                raise QuotaUnavailable("The quota service is unavailable; retry shortly.") from exc
            view = usage_report.budget_view(subject.limits, used, gov.settings.currency)
            out["team" if subject.id.startswith("team:") else "key"] = view
        return _json(out)

    return r
