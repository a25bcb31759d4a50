"""Keys, teams and the usage ledger in SQL: SQLite by default, PostgreSQL by URL.

Synchronous SQLAlchemy 2; the gateway calls it from worker threads (cache misses,
batched ledger writes), never on the event loop. The schema is Alembic's (`migrate`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Integer,
    String,
    create_engine,
    event,
    func,
    insert,
    select,
    tuple_,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from gateway.errors import KeyStoreUnavailable
from gateway.governance.keys import hash_key, key_prefix, new_key
from gateway.governance.limits import Limits
from gateway.governance.pricing import from_nanos
from gateway.governance.records import KeyRecord, UsageRow, as_utc, utcnow
from serve.engine import Endpoint
from serve.errors import InvalidRequest

MIGRATIONS = Path(__file__).parent / "migrations"
# What usage can be grouped and filtered by: the ledger's columns of the same names.
USAGE_GROUPS = ("day", "key_id", "team", "model", "version", "end_user", "endpoint")


class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    team: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    tier: Mapped[str] = mapped_column(String(50), default="default")
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    allowed_endpoints: Mapped[list[Endpoint] | None] = mapped_column(JSON, nullable=True)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rotated_from: Mapped[str | None] = mapped_column(String(40), nullable=True)


class TeamRow(Base):
    __tablename__ = "teams"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UsageRecordRow(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(100))
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    team: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)  # nano-units of the currency
    end_user: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the caller's `user`, cut
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[int] = mapped_column(Integer, default=200)
    finish_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    endpoint: Mapped[str | None] = mapped_column(String(20), nullable=True)  # null: rows written before 0003
    day: Mapped[str] = mapped_column(String(10), index=True)  # UTC YYYY-MM-DD: portable GROUP BY
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# The ledger's text columns and their lengths. A value the caller chose (its `user`, a model name it asked for) is
# made storable rather than the row refused and its usage lost: cut to the column, NUL (which PostgreSQL refuses
# in text) replaced.
USAGE_TEXT = {c.name: c.type.length for c in UsageRecordRow.__table__.columns if isinstance(c.type, String)}


def storable(value: str, length: int | None) -> str:
    """`value` as a text column of `length` characters stores it: NUL replaced by U+FFFD, cut to length."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value[:length] if length else value


class KeyNotFound(LookupError):
    """No key with that id."""


@contextlib.contextmanager
def reachable() -> Iterator[None]:
    """Turn database errors into KeyStoreUnavailable (503 in the envelope), not a 500; a value the database
    refuses (a NUL in text, a number out of its range) into InvalidRequest (400): retrying would not help."""
    try:
        yield
    except DataError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise InvalidRequest(f"The key store cannot store a value of this request: {reason}") from exc
    except SQLAlchemyError as exc:
        raise KeyStoreUnavailable("The key store is unavailable; retry shortly.") from exc


class StoreUnreachable(ValueError):
    """The key store cannot be opened at start: a one-line reason naming its URL without the password."""


def open_store(url: str, secret: bytes) -> KeyStore:
    """A store with its schema migrated to the newest revision, or StoreUnreachable."""
    store = KeyStore(url, secret)
    try:
        store.migrate()
    except SQLAlchemyError as exc:
        store.close()
        shown = make_url(url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StoreUnreachable(f"cannot open the key store at {shown}: {reason}") from None
    return store


class KeyStore:
    """Keys, teams and usage rows behind one SQLAlchemy engine."""

    def __init__(self, url: str, secret: bytes) -> None:
        self.url = url
        self._secret = secret
        self.engine: Engine = create_engine(url, pool_pre_ping=True, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    # -- schema ---------------------------------------------------------------
    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to `revision`, the newest by default (safe to call from many processes)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def close(self) -> None:
        self.engine.dispose()

    # -- keys -----------------------------------------------------------------
    def hash(self, key: str) -> str:
        return hash_key(self._secret, key)

    def create_key(
        self,
        *,
        name: str = "",
        owner: str | None = None,
        team: str | None = None,
        tier: str = "default",
        allowed_models: list[str] | None = None,
        allowed_endpoints: list[Endpoint] | None = None,
        limits: Limits | None = None,
        expires_at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        plaintext: str | None = None,
        rotated_from: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """Store a new key; return it with its plaintext (the only time anyone sees it)."""
        key = plaintext or new_key()
        row = ApiKeyRow(
            id="key_" + uuid.uuid4().hex[:20],
            key_hash=self.hash(key),
            prefix=key_prefix(key),
            name=name,
            owner=owner,
            team=team,
            tier=tier,
            allowed_models=allowed_models,
            allowed_endpoints=allowed_endpoints,
            limits=(limits or Limits()).model_dump(exclude_none=True),
            meta=metadata or {},
            created_at=utcnow(),
            expires_at=as_utc(expires_at),
            rotated_from=rotated_from,
        )
        with self._session.begin() as s:
            s.add(row)
            record = self._record(s, row)
        return record, key

    def lookup(self, key_hash: str) -> KeyRecord | None:
        """The key with this HMAC, revoked and expired ones included (the caller decides)."""
        with self._session() as s:
            row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash)).first()
            return self._record(s, row) if row is not None else None

    def get_key(self, key_id: str) -> KeyRecord:
        with self._session() as s:
            return self._record(s, self._row(s, key_id))

    def list_keys(
        self, *, include_revoked: bool = False, team: str | None = None, limit: int | None = None,
        after: str | None = None,
    ) -> list[KeyRecord]:
        """Keys oldest first; a page of `limit` of them after the key `after` (its id), if given."""
        k = ApiKeyRow
        with self._session() as s:
            q = select(k).order_by(k.created_at, k.id)
            if not include_revoked:
                q = q.where(k.revoked_at.is_(None))
            if team is not None:
                q = q.where(k.team == team)
            if after is not None:
                cursor = self._row(s, after)
                q = q.where(tuple_(k.created_at, k.id) > tuple_(cursor.created_at, cursor.id))
            if limit is not None:
                q = q.limit(limit)
            return [self._record(s, r) for r in s.scalars(q)]

    def update_key(self, key_id: str, **fields: Any) -> KeyRecord:
        """Change name, owner, team, tier, allowed_models, allowed_endpoints, limits, expires_at or metadata."""
        columns = {"metadata": "meta"}
        with self._session.begin() as s:
            row = self._row(s, key_id)
            for field, value in fields.items():
                if field == "limits" and isinstance(value, Limits):
                    value = value.model_dump(exclude_none=True)
                if field == "expires_at":
                    value = as_utc(value)
                setattr(row, columns.get(field, field), value)
            return self._record(s, row)

    def revoke_key(self, key_id: str) -> KeyRecord:
        with self._session.begin() as s:
            row = self._row(s, key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return self._record(s, row)

    def rotate_key(self, key_id: str, *, grace_s: float = 0.0) -> tuple[KeyRecord, str]:
        """A new key with the same settings; the old one stops now, or after `grace_s`."""
        old = self.get_key(key_id)
        if old.revoked_at is not None:
            raise KeyNotFound(key_id)
        record, plaintext = self.create_key(
            name=old.name, owner=old.owner, team=old.team, tier=old.tier, allowed_models=old.allowed_models,
            allowed_endpoints=old.allowed_endpoints, limits=old.limits, expires_at=old.expires_at, metadata=old.metadata, rotated_from=old.id,
        )
        if grace_s > 0:
            self.update_key(key_id, expires_at=utcnow() + timedelta(seconds=grace_s))
        else:
            self.revoke_key(key_id)
        return record, plaintext

    # -- teams ----------------------------------------------------------------
    def set_team(self, name: str, limits: Limits) -> Limits:
        with self._session.begin() as s:
            row = s.get(TeamRow, name)
            if row is None:
                s.add(TeamRow(name=name, limits=limits.model_dump(exclude_none=True), created_at=utcnow()))
            else:
                row.limits = limits.model_dump(exclude_none=True)
        return limits

    def list_teams(self) -> dict[str, Limits]:
        with self._session() as s:
            return {r.name: Limits.model_validate(r.limits) for r in s.scalars(select(TeamRow).order_by(TeamRow.name))}

    # -- usage ----------------------------------------------------------------
    def insert_usage(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        # One executemany through Core: an ORM unit of work per row cost the gateway ~20% of its CPU under load.
        # `__dict__`: a pydantic model's fields as they are (iterating the model costs ~10 µs a row).
        values = [{**r.__dict__, "day": r.created_at.astimezone(UTC).date().isoformat()} for r in rows]
        for v in values:
            for name, length in USAGE_TEXT.items():
                if isinstance(v.get(name), str):
                    v[name] = storable(v[name], length)
        with self.engine.begin() as conn:
            conn.execute(insert(UsageRecordRow.__table__), values)  # type: ignore[arg-type]

    def usage_summary(
        self, *, group_by: Sequence[str] = ("day", "key_id", "model"), since: date | None = None,
        until: date | None = None, limit: int | None = None, after: Sequence[str] | None = None, **where: str | None,
    ) -> list[dict[str, Any]]:
        """Requests, tokens and cost grouped by `group_by` (of USAGE_GROUPS), ordered by them; inclusive day bounds
        and a value per column of `where` (key_id, team, model, ... ; None: any); a page of `limit` groups after the
        group whose values are `after` (null values as ""), if given."""
        u = UsageRecordRow
        columns = [getattr(u, g) for g in group_by]
        ordered = [func.coalesce(c, "") for c in columns]
        q = select(*columns, *_usage_sums(u)).group_by(*columns).order_by(*ordered)
        q = _usage_where(q, since, until, where)
        if after is not None:
            q = q.where(tuple_(*ordered) > tuple_(*after))
        if limit is not None:
            q = q.limit(limit)
        with self._session() as s:
            return [_usage_view(dict(r._mapping)) for r in s.execute(q)]

    def usage_totals(self, *, since: date | None = None, until: date | None = None, **where: str | None) -> dict[str, Any]:
        """The same sums over every row `usage_summary` would group."""
        q = _usage_where(select(*_usage_sums(UsageRecordRow)), since, until, where)
        with self._session() as s:
            return _usage_view(dict(s.execute(q).one()._mapping))

    def budget_used(self, *, key_id: str | None = None, team: str | None = None, at: datetime) -> tuple[int, ...]:
        """What the ledger holds for a key or a team: tokens on `at`'s UTC day and in its UTC month, spend
        (nano-units) on that day, in that month and in all (quota_policy.BUDGETS' order)."""
        u = UsageRecordRow
        day = at.astimezone(UTC).date()
        tokens = func.coalesce(func.sum(u.prompt_tokens + u.completion_tokens), 0)
        cost = func.coalesce(func.sum(u.cost), 0)
        who = u.key_id == key_id if key_id is not None else u.team == team
        on_day, in_month = u.day == day.isoformat(), (u.day >= day.replace(day=1).isoformat()) & (u.day <= day.isoformat())
        with self._session() as s:
            day_row = s.execute(select(tokens, cost).where(who, on_day)).one()
            month_row = s.execute(select(tokens, cost).where(who, in_month)).one()
            spent = s.scalar(select(cost).where(who))
        return int(day_row[0]), int(month_row[0]), int(day_row[1]), int(month_row[1]), int(spent or 0)

    # -- helpers --------------------------------------------------------------
    @staticmethod
    def _row(s: Session, key_id: str) -> ApiKeyRow:
        row = s.get(ApiKeyRow, key_id)
        if row is None:
            raise KeyNotFound(key_id)
        return row

    @staticmethod
    def _record(s: Session, row: ApiKeyRow) -> KeyRecord:
        team_limits = None
        if row.team:
            team = s.get(TeamRow, row.team)
            team_limits = Limits.model_validate(team.limits) if team is not None else None
        return KeyRecord(
            id=row.id, name=row.name, prefix=row.prefix, owner=row.owner, team=row.team, tier=row.tier,
            allowed_models=row.allowed_models, allowed_endpoints=row.allowed_endpoints,
            limits=Limits.model_validate(row.limits or {}),
            team_limits=team_limits, metadata=row.meta or {}, created_at=as_utc(row.created_at),
            expires_at=as_utc(row.expires_at), revoked_at=as_utc(row.revoked_at),
        )


def _usage_sums(u: type[UsageRecordRow]) -> list[Any]:
    return [
        func.count().label("requests"),
        func.coalesce(func.sum(u.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(u.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(u.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(u.cost), 0).label("cost_nanos"),
        func.sum(func.cast(u.status >= 400, Integer)).label("errors"),
        func.avg(u.latency_ms).label("mean_latency_ms"),
    ]


def _usage_where(q: Any, since: date | None, until: date | None, where: dict[str, str | None]) -> Any:
    u = UsageRecordRow
    if since is not None:
        q = q.where(u.day >= since.isoformat())
    if until is not None:
        q = q.where(u.day <= until.isoformat())
    for column, value in where.items():
        if column not in USAGE_GROUPS:
            raise ValueError(f"usage has no column {column!r}")
        if value is not None:
            q = q.where(getattr(u, column) == value)
    return q


def _usage_view(row: dict[str, Any]) -> dict[str, Any]:
    """A group's sums as the admin API shows them: cost in the currency (and exact, in nano-units)."""
    for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_nanos", "errors"):
        row[name] = int(row[name] or 0)
    row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
    row["cost"] = from_nanos(row["cost_nanos"])
    row["mean_latency_ms"] = round(float(row["mean_latency_ms"] or 0.0), 3)
    return row


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (gateway lookups) never wait for the ledger writer
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
