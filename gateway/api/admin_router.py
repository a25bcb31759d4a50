"""`/admin/*`: keys, teams and usage, for the admin key only (user keys never pass).

No `from __future__ import annotations` here: FastAPI must see the route-local `Store` dependency alias.
"""


import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway.errors import NotFound, ServiceDisabled
from gateway.governance.gate import Governance
from gateway.governance.limits import Limits
from gateway.governance.records import KeyRecord
from gateway.governance.store import KeyNotFound, KeyStore, reachable


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200, description="Human label.")
    owner: str | None = Field(default=None, max_length=200, description="Owner (person or service).")
    team: str | None = Field(default=None, max_length=200, description="Team whose limits also apply.")
    tier: str = Field(default="default", max_length=50, description="Service tier (engine priority).")
    allowed_models: list[str] | None = Field(default=None, description="Models or aliases it may call; null: all.")
    limits: Limits = Field(default_factory=Limits, description="The key's own limits.")
    expires_at: datetime | None = Field(default=None, description="Refused after this instant.")
    expires_in_s: float | None = Field(default=None, gt=0, description="Alternative to expires_at: seconds from now.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form labels.")

    def expiry(self) -> datetime | None:
        if self.expires_in_s is not None:
            return datetime.now(UTC) + timedelta(seconds=self.expires_in_s)
        return self.expires_at


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200, description="Human label.")
    owner: str | None = Field(default=None, max_length=200, description="Owner.")
    team: str | None = Field(default=None, max_length=200, description="Team.")
    tier: str | None = Field(default=None, max_length=50, description="Service tier.")
    allowed_models: list[str] | None = Field(default=None, description="Allowed models; send [] to allow none.")
    limits: Limits | None = Field(default=None, description="Replaces the key's limits.")
    expires_at: datetime | None = Field(default=None, description="New expiry.")
    metadata: dict[str, Any] | None = Field(default=None, description="Replaces the labels.")


class Rotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: float = Field(default=0.0, ge=0, le=30 * 86400, description="How long the old key keeps working.")


class TeamLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: Limits = Field(description="Limits shared by every key of the team.")


def _json(data: Any, status: int = 200) -> Response:
    import orjson

    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _key_view(record: KeyRecord) -> dict[str, Any]:
    return record.model_dump(mode="json")


def admin_router(gov: Governance) -> APIRouter:
    async def admin(request: Request) -> KeyStore:
        gov.authenticate_admin(request)
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
            allowed_models=spec.allowed_models, limits=spec.limits, expires_at=spec.expiry(), metadata=spec.metadata,
        )
        return _json({"key": plaintext, **_key_view(record)}, 201)

    @r.get("/keys")
    async def list_keys(store: Store, include_revoked: bool = False, team: str | None = None) -> Response:
        records = await call(store.list_keys, include_revoked=include_revoked, team=team)
        return _json({"object": "list", "data": [_key_view(k) for k in records]})

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

    @r.get("/usage")
    async def usage(
        store: Store, since: date | None = None, until: date | None = None, key_id: str | None = None
    ) -> Response:
        if gov.ledger is not None:
            with reachable():
                await gov.ledger.flush()  # this process's pending rows first
        rows = await call(store.usage_summary, since=since, until=until, key_id=key_id)
        return _json({"object": "list", "data": rows})

    return r
