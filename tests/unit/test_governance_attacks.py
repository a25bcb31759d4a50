"""Governance under attack, on the in-process gateway and the fake engine: every case here was a hole.

Reservations bound what the engine may do, refusals are not free, a forbidden model looks unknown,
/admin checks its key before it reads a byte, /metrics takes no label from a client, and every
concurrency slot comes back however a request ends.
"""

from __future__ import annotations

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
from tests.support import asgi_call

KEY = "test-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
MSG = [{"role": "user", "content": "hello there"}]
CHAT_PROMPT = 4 + len(b"hello there") // 4 + 2  # the gateway's estimate of MSG


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine("fake", FakeEngineConfig(max_model_len=256))


@pytest.fixture
def app(engine, tmp_path) -> Any:
    settings = GatewaySettings(
        api_keys=[KEY], admin_key=ADMIN, home=tmp_path,
        routes={"smart": {"targets": [{"model": "fake", "weight": 1}], "fallbacks": ["other"]}},
    )
    other = FakeEngine("other", FakeEngineConfig(max_model_len=256))
    return create_app(settings, ModelBackend({"fake": engine, "other": other}, aliases={"chat": "fake"}))


@pytest.fixture
async def http(app) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


def new_key(app: Any, **kw: Any) -> dict[str, str]:
    _, key = app.state.governance.store.create_key(name="t", **kw)
    return {"authorization": f"Bearer {key}"}


ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}


async def test_n_choices_reserve_every_choice(app, http) -> None:
    auth = new_key(app, limits=Limits(tpm=10_000))
    for n in (2, "2"):  # a string vLLM would coerce is coerced before it is counted, and sent as counted
        r = await http.post("/v1/chat/completions", headers=auth,
                            json={"model": "fake", "messages": MSG, "max_tokens": 10, "n": n})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] == 20
    # the reservation (prompt + 2 x 10) was admitted against the window and settled to real usage
    # the first settled to its real usage (2 prompt words + 20); the second holds its reservation, both choices
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 10_000 - (2 + 20) - (CHAT_PROMPT + 2 * 10)


async def test_a_batch_counts_a_request_a_prompt_and_reserves_them_all(app, http) -> None:
    auth = new_key(app, limits=Limits(max_concurrent=4, tpm=100_000))
    body = {"model": "fake", "prompt": ["a b"] * 6, "max_tokens": 5}
    r = await http.post("/v1/completions", headers=auth, json=body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"  # 6 sequences > 4 at once
    r = await http.post("/v1/completions", headers=auth, json={**body, "prompt": ["a b"] * 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    r = await http.post("/v1/completions", headers=auth, json={**body, "prompt": "a b", "max_tokens": 200,
                                                                  "max_completion_tokens": 1})
    assert r.json()["usage"]["completion_tokens"] == 200  # what vLLM does too: max_completion_tokens is chat's


async def test_unknown_and_forbidden_models_look_the_same_and_count_against_rpm(app, http) -> None:
    auth = new_key(app, allowed_models=["chat"], limits=Limits(rpm=3))
    unknown = await http.post("/v1/chat/completions", headers=auth, json={"model": "nope", "messages": MSG})
    forbidden = await http.post("/v1/chat/completions", headers=auth, json={"model": "other", "messages": MSG})
    assert unknown.status_code == forbidden.status_code == 404
    assert unknown.json()["error"]["message"].replace("nope", "X") == forbidden.json()["error"]["message"].replace(
        "other", "X")
    assert (await http.get("/v1/models/other", headers=auth)).status_code == 404
    ok = await http.post("/v1/chat/completions", headers=auth, json={"model": "chat", "messages": MSG, "max_tokens": 1})
    assert ok.status_code == 200
    probe = await http.post("/v1/chat/completions", headers=auth, json={"model": "probe", "messages": MSG})
    assert probe.status_code == 429  # two refusals and one success used the window's three requests


async def test_a_route_takes_a_key_only_where_its_list_allows(app, engine, http) -> None:
    engine.cfg.fail_rate = 1.0  # the route's first target fails before output: it would fall back to "other"
    engine.cfg.fail_after_tokens = None
    only_fake = new_key(app, allowed_models=["fake"])
    r = await http.post("/v1/chat/completions", headers=only_fake,
                        json={"model": "smart", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"  # no fallback to "other"
    route_key = new_key(app, allowed_models=["smart"])
    r = await http.post("/v1/chat/completions", headers=route_key,
                        json={"model": "smart", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "other"  # the route on the list grants its fallbacks
    none = new_key(app, allowed_models=["chat"])
    r = await http.post("/v1/chat/completions", headers=none, json={"model": "smart", "messages": MSG})
    assert r.status_code == 404


async def test_deep_nesting_is_a_400_not_a_500(app, http) -> None:
    auth = new_key(app, limits=Limits(tpm=10_000))
    deep = "[" * 990 + "]" * 990
    raw = ('{"model":"fake","messages":[{"role":"user","content":[{"type":"text","text":"a","x":' + deep + "}]}]}")
    r = await http.post("/v1/chat/completions", headers={**auth, "content-type": "application/json"}, content=raw)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_admin_checks_its_key_before_the_body(http) -> None:
    r = await http.post("/admin/keys", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    big = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    r = await http.post("/admin/keys", content=big, headers={**ADMIN_AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    r = await http.post("/admin/keys", content=b"{not json", headers={**ADMIN_AUTH, "content-type": "application/json"})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", "/admin/keys", {"expires_in_s": 1e15}, "expires_in_s"),
        ("POST", "/admin/keys", {"expires_at": "0001-01-01T00:00:00+14:00"}, "expires_at"),  # before year 1 in UTC
        ("PATCH", "/admin/keys/{id}", {"expires_at": "0001-01-01T00:00:00+14:00"}, "expires_at"),
        ("PATCH", "/admin/keys/{id}", {"name": None}, "name"),
        ("PATCH", "/admin/keys/{id}", {"tier": None}, "tier"),
        ("PATCH", "/admin/keys/{id}", {"limits": None}, "limits"),
        ("GET", "/admin/keys?limit=0", None, "limit"),
        ("GET", "/admin/usage?after=nope", None, "after"),
    ],
)
async def test_admin_bad_input_is_a_400_naming_the_field(http, method, path, body, param) -> None:
    created = (await http.post("/admin/keys", headers=ADMIN_AUTH, json={"name": "x"})).json()
    r = await http.request(method, path.format(id=created["id"]), headers=ADMIN_AUTH, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_an_expiry_offset_is_honoured_on_sqlite(http) -> None:
    r = await http.post("/admin/keys", headers=ADMIN_AUTH, json={"expires_at": "2030-01-01T00:00:00+05:00"})
    key_id = r.json()["id"]
    stored = (await http.get(f"/admin/keys/{key_id}", headers=ADMIN_AUTH)).json()["expires_at"]
    assert stored.startswith("2029-12-31T19:00:00")


async def test_admin_lists_page(http) -> None:
    ids = [(await http.post("/admin/keys", headers=ADMIN_AUTH, json={"name": f"k{i}"})).json()["id"] for i in range(5)]
    seen, after = [], None
    while True:
        page = (await http.get("/admin/keys", headers=ADMIN_AUTH,
                               params={"limit": 2, **({"after": after} if after else {})})).json()
        seen += [k["id"] for k in page["data"]]
        assert len(page["data"]) <= 2
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids


async def test_usage_pages(app, http) -> None:
    for model in ("fake", "other", "chat"):
        auth = new_key(app)
        r = await http.post("/v1/chat/completions", headers=auth, json={"model": model, "messages": MSG, "max_tokens": 1})
        assert r.status_code == 200
    await app.state.governance.ledger.flush()
    first = (await http.get("/admin/usage", headers=ADMIN_AUTH, params={"limit": 2})).json()
    rest = (await http.get("/admin/usage", headers=ADMIN_AUTH, params={"limit": 2, "after": first["last_id"]})).json()
    assert first["has_more"] and not rest["has_more"]
    assert len(first["data"]) + len(rest["data"]) == 3


async def test_metrics_need_the_admin_key_and_take_no_label_from_clients(app, http) -> None:
    assert (await http.get("/metrics")).status_code == 401
    auth = new_key(app)
    for i in range(5):
        await http.post("/v1/chat/completions", headers=auth, json={"model": f"made-up-{i}", "messages": MSG})
    await http.post("/v1/chat/completions", headers=auth, json={"model": "chat", "messages": MSG, "max_tokens": 1})
    text = (await http.get("/metrics", headers=ADMIN_AUTH)).text
    assert "made-up" not in text and 'model="chat"' in text
    assert 'key="other"' in text and "key_" not in text  # no key has a series of its own unless listed


async def test_a_stream_dropped_before_its_first_byte_frees_its_slot(app, http) -> None:
    auth = new_key(app, limits=Limits(max_concurrent=1))
    body = {"model": "fake", "messages": MSG, "max_tokens": 3, "stream": True}
    for _ in range(3):
        await asgi_call(app, "/v1/chat/completions", body, auth, sends_before_reset=0)
    r = await http.post("/v1/chat/completions", headers=auth, json=body)
    assert r.status_code == 200, r.text  # the dropped streams gave their slot back


async def test_a_full_response_dropped_midway_is_charged_its_bound(app, engine, http) -> None:
    auth = new_key(app, limits=Limits(tpm=100_000))
    engine.cfg.ttft_ms = 2000
    sent = await asgi_call(app, "/v1/chat/completions", {"model": "fake", "messages": MSG, "max_tokens": 50}, auth,
                           leave_after_s=0.05)
    assert sent[0]["status"] == 499
    engine.cfg.ttft_ms = 0
    r = await http.post("/v1/chat/completions", headers=auth, json={"model": "fake", "messages": MSG, "max_tokens": 1})
    # charged CHAT_PROMPT + 50 for the dropped one (the engine could not say what it had made), then this one
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 100_000 - (CHAT_PROMPT + 50) - (CHAT_PROMPT + 1)


def test_an_adapter_is_granted_by_its_own_name_not_its_base(app) -> None:
    from gateway.governance.gate import Governance
    from gateway.governance.records import KeyRecord
    from serve.errors import ModelNotFound

    backend = app.state.backend
    base_only = KeyRecord(id="k", prefix="rg-", allowed_models=["fake"])
    assert backend.grant_names("chat") == ("chat", "fake")  # an alias goes by its target too
    assert Governance.authorize(base_only, "chat", ["chat"], backend.grant_names, route=False) == ["chat"]
    with pytest.raises(ModelNotFound):  # an adapter on "fake" (not a served id or alias) needs its own name
        Governance.authorize(base_only, "fake-sql-lora", ["fake-sql-lora"], backend.grant_names, route=False)
    lora = KeyRecord(id="k", prefix="rg-", allowed_models=["fake-sql-lora"])
    assert Governance.authorize(lora, "fake-sql-lora", ["fake-sql-lora"], backend.grant_names, route=False)
