"""Usage and spend through `/admin/usage` and `/admin/usage.csv` (in-process gateway, fake engine, SQLite ledger)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.limits import Limits
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine

ADMIN = {"authorization": "Bearer admin-key-0123456789abcdef"}
MSG = [{"role": "user", "content": "one two three"}]  # the fake engine's prompt: 3 tokens


@pytest.fixture
async def gw(tmp_path) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    settings = GatewaySettings(
        admin_key="admin-key-0123456789abcdef", home=tmp_path, currency="EUR",
        prices={"fake": {"input": 1000, "output": 2000}, "*": {"input": 10, "output": 10}},
    )
    engines = {"fake": FakeEngine("fake", FakeEngineConfig()), "other": FakeEngine("other", FakeEngineConfig())}
    app = create_app(settings, ModelBackend(engines))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        yield app, http


async def _chat(http: httpx.AsyncClient, key: str, model: str, tokens: int, **extra: Any) -> None:
    r = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                        json={"model": model, "messages": MSG, "max_tokens": tokens, **extra})
    assert r.status_code == 200, r.text


async def test_usage_groups_filters_totals_and_csv(gw) -> None:
    app, http = gw
    store = app.state.governance.store
    a, key_a = store.create_key(name="a", team="red")
    _, key_b = store.create_key(name="b", team="blue")
    await _chat(http, key_a, "fake", 10, user="alice")  # 3 × 0.001 + 10 × 0.002 = 0.023
    await _chat(http, key_a, "fake", 5, user="bob")  # 0.013
    await _chat(http, key_b, "other", 100, user="=HYPERLINK(\"x\")")  # `*`: 103 × 0.00001 = 0.00103
    r = await http.post("/v1/messages", headers={"x-api-key": key_b, "anthropic-version": "2023-06-01"},
                        json={"model": "fake", "max_tokens": 4, "messages": MSG, "metadata": {"user_id": "carol"}})
    assert r.status_code == 200, r.text
    await app.state.governance.ledger.flush()

    r = await http.get("/admin/usage", headers=ADMIN, params={"group_by": "team,end_user"})
    body = r.json()
    assert r.status_code == 200 and body["currency"] == "EUR" and body["group_by"] == ["team", "end_user"]
    by = {(g["team"], g["end_user"]): g for g in body["data"]}
    assert by["red", "alice"]["cost"] == 0.023 and by["red", "bob"]["cost"] == 0.013
    assert by["blue", "=HYPERLINK(\"x\")"]["cost_nanos"] == 1_030_000 and ("blue", "carol") in by
    assert body["totals"]["requests"] == 4 and body["totals"]["cost_nanos"] == sum(g["cost_nanos"] for g in body["data"])

    only = (await http.get("/admin/usage", headers=ADMIN, params={"key_id": a.id, "group_by": "model"})).json()
    assert [(g["model"], g["requests"], g["cost"]) for g in only["data"]] == [("fake", 2, 0.036)]
    assert only["totals"]["completion_tokens"] == 15

    pages, after = [], None  # every group once, page by page, whatever the values hold
    while True:
        page = (await http.get("/admin/usage", headers=ADMIN, params={
            "group_by": "end_user", "limit": 1, **({"after": after} if after else {})})).json()
        pages += [g["end_user"] for g in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(pages) == sorted(u for _, u in by)

    r = await http.get("/admin/usage.csv", headers=ADMIN, params={"group_by": "key_id,end_user"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 4 and "cost_eur" in rows[0] and "cached_tokens" in rows[0]
    assert {row["end_user"] for row in rows} >= {"alice", "'=HYPERLINK(\"x\")"}  # never a formula in a spreadsheet
    assert sum(float(row["cost_eur"]) for row in rows) == pytest.approx(body["totals"]["cost"])


@pytest.mark.parametrize("query", [{"group_by": "day,password"}, {"group_by": ""}, {"group_by": "day,day"},
                                   {"after": "bm9wZQ"}, {"group_by": "model", "after": "WyJhIiwiYiJd"}])
async def test_bad_usage_queries_get_the_envelope(gw, query) -> None:
    _, http = gw
    for path in ("/admin/usage", "/admin/usage.csv"):
        if path.endswith("csv") and "after" in query:
            continue
        r = await http.get(path, headers=ADMIN, params=query)
        assert r.status_code == 400, (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["param"] in ("group_by", "after")


async def test_a_keys_budget_shows_limits_and_live_use(gw) -> None:
    app, http = gw
    record, key = app.state.governance.store.create_key(name="b", limits=Limits(rpm=100, spend_per_day=1.0))
    await _chat(http, key, "fake", 10)
    r = await http.get(f"/admin/keys/{record.id}/budget", headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["key"] == {"requests": {"limit": 100, "used": 1, "unit": "requests"},
                               "spend_day": {"limit": 1.0, "used": 0.023, "unit": "EUR"}}
    assert (await http.get("/admin/keys/key_nope/budget", headers=ADMIN)).status_code == 404
