"""A key database that cannot be reached answers 503 in the OpenAI envelope, never a 500."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.gate import Governance
from gateway.governance.quota import LocalQuota
from gateway.governance.store import KeyStore
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine

ADMIN = "rg-admin-unit-0123456789abcdef"


async def test_unreachable_key_store_is_503(tmp_path: Path) -> None:
    settings = GatewaySettings(home=tmp_path, admin_key=ADMIN)
    secret = b"s" * 32
    store = KeyStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1", secret)
    gov = Governance(settings, secret=secret, store=store, limiter=LocalQuota(), ledger=None)
    app = create_app(settings, ModelBackend({"f": FakeEngine("f", FakeEngineConfig())}), gov)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        for r in (
            await c.get("/v1/models", headers={"authorization": "Bearer rg-some-user-key"}),
            await c.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}),
        ):
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "key_store_unavailable"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
