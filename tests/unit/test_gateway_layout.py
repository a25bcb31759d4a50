"""The gateway's seams: the generation service without HTTP, the direct path and middleware, the OpenAPI bodies."""

from __future__ import annotations

import httpx
import orjson
from starlette.requests import Request

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine

KEY = "test-key-0123456789abcdef"
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3, "seed": 5}


def _app(tmp_path):  # type: ignore[no-untyped-def]
    engines = {"fake": FakeEngine("fake", FakeEngineConfig())}
    return create_app(GatewaySettings(api_keys=[KEY], home=tmp_path, metrics=False), ModelBackend(engines))


def _client(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                             headers={"authorization": f"Bearer {KEY}"})


async def test_the_generation_service_answers_without_an_http_server(tmp_path) -> None:
    app = _app(tmp_path)
    raw = orjson.dumps(BODY)
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")],
        "query_string": b"", "app": app, "state": {}}
    response = await app.state.generation.create("chat", Request(scope, receive))
    assert response.status_code == 200
    assert orjson.loads(response.body)["choices"][0]["message"]["content"] == "tok5 tok6 tok7 "
    await app.state.governance.close()


async def test_generation_takes_the_direct_path_while_the_app_has_no_middleware(tmp_path) -> None:
    app = _app(tmp_path)
    async with _client(app) as http:
        assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
        assert app.middleware_stack is None, "a generation request went through Starlette's stack"
        assert (await http.get("/v1/models")).status_code == 200
        assert app.middleware_stack is not None  # every other route does


async def test_a_middleware_added_later_sees_the_generation_routes(tmp_path) -> None:
    app = _app(tmp_path)
    seen: list[str] = []

    @app.middleware("http")
    async def record(request, call_next):  # type: ignore[no-untyped-def]
        seen.append(request.url.path)
        response = await call_next(request)
        response.headers["x-seen"] = "1"
        return response

    async with _client(app) as http:
        chat = await http.post("/v1/chat/completions", json=BODY)
        completion = await http.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2})
        bad = await http.post("/v1/chat/completions", json={"model": "fake", "messages": []})
        denied = await http.post("/v1/chat/completions", json=BODY, headers={"authorization": "Bearer nope"})
    assert seen == ["/v1/chat/completions", "/v1/completions", "/v1/chat/completions", "/v1/chat/completions"]
    assert chat.status_code == completion.status_code == 200 and chat.headers["x-seen"] == "1"
    assert chat.json()["choices"][0]["message"]["content"] == "tok5 tok6 tok7 "
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"


async def test_the_openapi_document_shows_the_request_bodies(tmp_path) -> None:
    async with _client(_app(tmp_path)) as http:
        doc = (await http.get("/openapi.json")).json()
    for path, schema in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith(schema), body
        assert {"200", "400", "401", "429", "503"} <= set(doc["paths"][path]["post"]["responses"])
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
