"""`/v1/models` shows a key the models and routes it may call, and nothing else."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.routing.routes import RouteConfig
from gateway.settings import GatewaySettings
from serve.fake_engine import FakeEngine

ADMIN = "rg-admin-test-0123456789abcdef"


async def test_models_are_filtered_by_the_keys_allow_list(tmp_path: Path) -> None:
    settings = GatewaySettings(home=tmp_path, admin_key=ADMIN, routes={
        "chat": RouteConfig.model_validate({"targets": [{"model": "small"}], "fallbacks": ["big"]})})
    backend = ModelBackend({"small": FakeEngine("small"), "big": FakeEngine("big")})
    app = create_app(settings, backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        admin = {"authorization": f"Bearer {ADMIN}"}

        async def key(allowed: list[str] | None) -> dict[str, str]:
            r = await http.post("/admin/keys", headers=admin, json={"name": "k", "allowed_models": allowed})
            assert r.status_code == 201, r.text
            return {"authorization": f"Bearer {r.json()['key']}"}

        everything, route_only, big_only = await key(None), await key(["chat"]), await key(["big"])

        async def ids(headers: dict[str, str]) -> set[str]:
            r = await http.get("/v1/models", headers=headers)
            assert r.status_code == 200
            return {m["id"] for m in r.json()["data"]}

        assert await ids(everything) == {"small", "big", "chat"}
        assert await ids(route_only) == {"chat"}
        assert await ids(big_only) == {"big"}

        chat = await http.get("/v1/models/chat", headers=route_only)
        assert chat.status_code == 200 and chat.json()["id"] == "chat" and chat.json()["root"] == "small"
        hidden = await http.get("/v1/models/small", headers=big_only)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
        assert (await http.get("/v1/models/big", headers=big_only)).status_code == 200
        assert (await http.get("/v1/models")).status_code == 401
