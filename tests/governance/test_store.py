"""The key store and ledger on SQLite and on the machine's PostgreSQL (a database of our own)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.governance.limits import Limits
from gateway.governance.records import UsageRow
from gateway.governance.store import KeyNotFound, KeyStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    url = f"sqlite:///{tmp_path / 'k.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = KeyStore(url, b"s" * 32)
    s.migrate()
    s.migrate()  # idempotent
    yield s
    if request.param == "postgresql":
        with s.engine.begin() as c:
            c.execute(text("TRUNCATE api_keys, teams, usage"))
    s.close()


def test_create_lookup_and_no_plaintext_stored(store: KeyStore) -> None:
    record, plaintext = store.create_key(name="ci", owner="ana", team="ml", tier="premium",
                                         allowed_models=["chat"], limits=Limits(rpm=5))
    assert plaintext.startswith("rg-") and record.prefix == plaintext[:11]
    found = store.lookup(store.hash(plaintext))
    assert found is not None and found.id == record.id and found.limits.rpm == 5 and found.tier == "premium"
    assert store.lookup(store.hash(plaintext + "x")) is None
    with store.engine.connect() as c:
        dump = repr([tuple(r) for r in c.execute(text("SELECT * FROM api_keys"))])
    assert plaintext not in dump and plaintext[11:] not in dump


def test_revoke_rotate_expire(store: KeyStore) -> None:
    record, old = store.create_key(name="r")
    new_record, new = store.rotate_key(record.id)
    assert store.lookup(store.hash(old)).revoked_at is not None  # type: ignore[union-attr]
    assert store.lookup(store.hash(new)).usable()  # type: ignore[union-attr]
    graced, _ = store.create_key(name="g")
    store.rotate_key(graced.id, grace_s=60)
    assert store.get_key(graced.id).usable()
    assert not store.get_key(graced.id).usable(datetime.now(UTC) + timedelta(seconds=61))
    store.revoke_key(new_record.id)
    assert not store.get_key(new_record.id).usable()
    active = store.list_keys()
    assert sorted(k.name for k in active) == ["g", "g"] and graced.id in {k.id for k in active}
    assert len(store.list_keys(include_revoked=True)) == 4
    with pytest.raises(KeyNotFound):
        store.revoke_key("key_nope")


def test_team_limits_travel_with_the_key(store: KeyStore) -> None:
    store.set_team("ml", Limits(rpm=7))
    record, plaintext = store.create_key(team="ml")
    assert store.lookup(store.hash(plaintext)).team_limits == Limits(rpm=7)  # type: ignore[union-attr]
    assert store.list_teams() == {"ml": Limits(rpm=7)}
    store.update_key(record.id, limits=Limits(tpm=9), tier="batch")
    assert store.get_key(record.id).limits == Limits(tpm=9)


def test_usage_summary_by_key_model_day(store: KeyStore) -> None:
    day1 = datetime(2026, 11, 1, 12, tzinfo=UTC)
    rows = [
        UsageRow(request_id=f"r{i}", key_id="key_a", model="m", prompt_tokens=3, completion_tokens=5,
                 latency_ms=10, created_at=day1)
        for i in range(3)
    ] + [
        UsageRow(request_id="e", key_id="key_a", model="m", status=429, created_at=day1),
        UsageRow(request_id="x", key_id="key_b", model="m", prompt_tokens=1, completion_tokens=1,
                 created_at=day1 + timedelta(days=1)),
    ]
    store.insert_usage(rows)
    out = store.usage_summary()
    assert [(r["key_id"], r["day"], r["requests"], r["total_tokens"], r["errors"]) for r in out] == [
        ("key_a", "2026-11-01", 4, 24, 1),
        ("key_b", "2026-11-02", 1, 2, 0),
    ]
    assert len(store.usage_summary(since=date(2026, 11, 2))) == 1
    assert store.usage_summary(key_id="key_a")[0]["prompt_tokens"] == 9


async def test_a_row_the_database_refuses_does_not_hold_back_the_others(tmp_path: Path, pg_url: str) -> None:
    from gateway.governance.ledger import UsageLedger

    store = KeyStore(pg_url, b"s" * 32)
    store.migrate()
    try:
        ledger = UsageLedger(store)
        good = [UsageRow(request_id=f"ok-{i}", key_id="key_ledger", model="m", completion_tokens=1) for i in range(3)]
        bad = UsageRow(request_id="big", key_id="key_ledger", model="m", prompt_tokens=2**40)  # over PostgreSQL's INTEGER
        for row in (good[0], bad, *good[1:]):
            ledger.record(row)
        await ledger.close()
        assert ledger.pending == 0 and ledger.dropped == 1 and ledger.written == 4
        assert [r["requests"] for r in store.usage_summary(key_id="key_ledger")] == [3]
    finally:
        with store.engine.begin() as c:
            c.execute(text("DELETE FROM usage WHERE key_id = 'key_ledger'"))
        store.close()


def test_text_a_caller_chose_never_costs_its_usage_row(store: KeyStore) -> None:
    # A NUL in OpenAI's `user` (PostgreSQL refuses NUL in text) and a model name longer than its column: the row is
    # written, the text made storable, instead of the database refusing the row and the request going unbilled.
    store.insert_usage([
        UsageRow(request_id="nul", key_id="key_text", model="m", end_user="ana\x00x", completion_tokens=5, cost=7),
        UsageRow(request_id="long", key_id="key_text", model="m" * 300, end_user="u" * 300, completion_tokens=1),
    ])
    rows = store.usage_summary(group_by=("model", "end_user"), key_id="key_text")
    assert [(len(r["model"]), r["end_user"], r["completion_tokens"]) for r in rows] == [
        (1, "ana\ufffdx", 5), (200, "u" * 200, 1)]


def test_a_value_the_database_refuses_is_the_callers_error_not_an_outage(pg_url: str) -> None:
    from gateway.governance.store import reachable
    from serve.errors import InvalidRequest

    store = KeyStore(pg_url, b"s" * 32)
    store.migrate()
    try:
        with pytest.raises(InvalidRequest, match="cannot contain NUL"), reachable():
            store.set_team("a\x00b", Limits())
        with pytest.raises(InvalidRequest, match="cannot contain NUL"), reachable():
            store.create_key(name="a\x00b")
    finally:
        store.close()


def test_endpoint_allow_list_round_trips_and_survives_rotation(store: KeyStore) -> None:
    record, _ = store.create_key(name="agents", allowed_endpoints=["responses", "messages"])
    assert store.get_key(record.id).allowed_endpoints == ["responses", "messages"]
    assert record.may_call("messages") and not record.may_call("chat")
    rotated, _ = store.rotate_key(record.id)
    assert rotated.allowed_endpoints == ["responses", "messages"]
    assert store.update_key(rotated.id, allowed_endpoints=None).may_call("chat")


def test_a_store_of_the_first_schema_upgrades_and_keeps_its_keys(tmp_path: Path) -> None:
    old = KeyStore(f"sqlite:///{tmp_path / 'old.db'}", b"s" * 32)
    old.migrate("0001")  # a key store written before endpoint allow-lists existed
    with old.engine.begin() as c:
        c.execute(text(
            "INSERT INTO api_keys (id, key_hash, prefix, name, tier, limits, metadata, created_at) "
            "VALUES ('key_old', :h, 'rg-', 'old', 'default', '{}', '{}', '2026-01-01 00:00:00+00:00')"),
            {"h": old.hash("rg-old-key")})
    old.migrate()
    record = old.lookup(old.hash("rg-old-key"))
    assert record is not None and record.id == "key_old" and record.allowed_endpoints is None
    assert record.may_call("responses")
    old.close()
