"""A key's endpoint allow-list (`allowed_endpoints`): set through the admin API, refused with 403 in the route's
own error shape, counted against the key's rpm."""

from __future__ import annotations

import httpx

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine

ADMIN = {"authorization": "Bearer admin-key-0123456789abcdef"}
MSG = [{"role": "user", "content": "hello there"}]


async def test_an_endpoint_off_the_list_is_a_403_in_the_route_s_shape_and_counts(tmp_path) -> None:  # noqa: ANN001
    app = create_app(GatewaySettings(home=tmp_path, admin_key=ADMIN["authorization"][7:]),
                     ModelBackend({"fake": FakeEngine("fake", FakeEngineConfig())}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        r = await http.post("/admin/keys", headers=ADMIN, json={"name": "bad", "allowed_endpoints": ["images"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_endpoints[0]", r.text
        r = await http.post("/admin/keys", headers=ADMIN,
                            json={"name": "chat only", "allowed_endpoints": ["chat"], "limits": {"rpm": 6}})
        assert r.status_code == 201 and r.json()["allowed_endpoints"] == ["chat"], r.text
        key_id, auth = r.json()["id"], {"authorization": f"Bearer {r.json()['key']}"}
        r = await http.post("/v1/chat/completions", headers=auth,
                            json={"model": "fake", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 200
        r = await http.post("/v1/responses", headers=auth, json={"model": "fake", "input": "hi"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "endpoint_not_allowed", r.text
        r = await http.post("/v1/messages", headers=auth, json={"model": "fake", "max_tokens": 2, "messages": MSG})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
        r = await http.post("/v1/messages/count_tokens", headers=auth, json={"model": "fake", "messages": MSG})
        assert r.status_code == 403  # a Messages route too
        r = await http.post("/v1/embeddings", headers=auth, json={"model": "fake", "input": "hi"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "endpoint_not_allowed", r.text
        r = await http.post("/tokenize", headers=auth, json={"model": "fake", "prompt": "hi"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "endpoint_not_allowed", r.text
        r = await http.post("/v1/chat/completions", headers=auth,
                            json={"model": "fake", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 429  # the five refusals counted: with the first chat, the rpm of 6 is spent
        r = await http.patch(f"/admin/keys/{key_id}", headers=ADMIN, json={"allowed_endpoints": None})
        assert r.status_code == 200 and r.json()["allowed_endpoints"] is None
