"""raygate in front of an OpenAI-compatible upstream (engine `openai`), over real HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.routing.routes import RouteConfig
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig, ModelDeploymentConfig, UpstreamConfig
from serve.errors import EngineFailure, EngineOverloaded, EngineUnavailable, InvalidRequest
from serve.factory import create_engine
from serve.fake_engine import FakeEngine
from serve.remote_engine import RemoteEngine, upstream_error

KEY = "test-key-0123456789abcdef"
MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def gateway(upstream: str, tmp_path):  # noqa: ANN201
    remote = create_engine(ModelDeploymentConfig(model="up", served_name="proxied", engine="openai",
                                                 upstream=UpstreamConfig(base_url=upstream)), None)
    dead = RemoteEngine("dead", "up", UpstreamConfig(base_url="http://127.0.0.1:9/v1", connect_timeout_s=1))
    local = FakeEngine("local", FakeEngineConfig())
    for e in (remote, dead):
        await e.start()
    settings = GatewaySettings(
        api_keys=[KEY], home=tmp_path,
        routes={"safe": RouteConfig.model_validate({"targets": [{"model": "dead"}], "fallbacks": ["proxied"]})},
    )
    app = create_app(settings, ModelBackend({"proxied": remote, "dead": dead, "local": local}))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    client = openai.AsyncOpenAI(api_key=KEY, base_url="http://gw/v1", http_client=http, _strict_response_validation=True)
    yield client, http
    await http.aclose()
    for e in (remote, dead):
        await e.shutdown()


async def test_full_response_passes_through(gateway) -> None:  # noqa: ANN001
    client, _ = gateway
    resp = await client.chat.completions.create(model="proxied", messages=MSG, max_tokens=3, seed=5)
    assert resp.choices[0].message.content == "tok5 tok6 tok7 "
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    done = await client.completions.create(model="proxied", prompt="a b c", max_tokens=2)
    assert done.choices[0].text == "tok0 tok1 "


async def test_stream_is_whole_events_and_usage_only_when_asked(gateway) -> None:  # noqa: ANN001
    client, _ = gateway
    stream = await client.chat.completions.create(model="proxied", messages=MSG, max_tokens=6, stream=True)
    chunks = [c async for c in stream]
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == "".join(f"tok{i} " for i in range(6))
    assert all(c.usage is None for c in chunks)  # the gateway asked for usage (quotas) and dropped it
    stream = await client.chat.completions.create(model="proxied", messages=MSG, max_tokens=6, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


async def test_every_route_forwards_to_the_upstream(gateway) -> None:  # noqa: ANN001
    """Responses, Messages, embeddings, tokenize and detokenize reach the upstream's own paths (tokenize beside
    `/v1`, as vLLM serves it) and come back as the upstream answered, streams as whole events."""
    client, http = gateway
    auth = {"authorization": f"Bearer {KEY}"}
    resp = await client.responses.create(model="proxied", input="hello there", max_output_tokens=3)
    assert resp.output_text == "tok0 tok1 tok2 " and resp.usage is not None and resp.usage.output_tokens == 3
    events = [e.type async for e in await client.responses.create(model="proxied", input="hi", max_output_tokens=2,
                                                                    stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    r = await http.post("/v1/messages", headers=auth, json={"model": "proxied", "max_tokens": 2, "messages": MSG})
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 2, r.text
    emb = await client.embeddings.create(model="proxied", input=["a b", "c"], encoding_format="float")
    assert [len(d.embedding) for d in emb.data] == [64, 64] and emb.usage.prompt_tokens == 3
    r = await http.post("/tokenize", headers=auth, json={"model": "proxied", "prompt": "tok3 tok4"})
    assert r.status_code == 200 and r.json()["tokens"] == [3, 4], r.text
    r = await http.post("/detokenize", headers=auth, json={"model": "proxied", "tokens": [3, 4]})
    assert r.status_code == 200 and r.json() == {"prompt": "tok3 tok4"}, r.text
    r = await http.post("/detokenize", headers=auth, json={"model": "proxied", "tokens": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"  # the upstream's 400, as it sent it


async def test_upstream_errors_keep_their_class(gateway) -> None:  # noqa: ANN001
    client, http = gateway
    with pytest.raises(openai.BadRequestError) as bad:  # the upstream's own 400 (context length)
        await client.chat.completions.create(model="proxied", messages=MSG, max_tokens=100_000)
    assert bad.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    r = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                        json={"model": "dead", "messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert r.headers.get("retry-after")


async def test_fallback_from_an_unreachable_upstream(gateway) -> None:  # noqa: ANN001
    client, _ = gateway
    resp = await client.chat.completions.create(model="safe", messages=MSG, max_tokens=2)
    assert resp.choices[0].message.content == "tok0 tok1 "


def test_upstream_error_mapping() -> None:
    body = b'{"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}'
    over = upstream_error(429, body, "7")
    assert isinstance(over, EngineOverloaded) and over.retry_after_s == 7
    assert isinstance(upstream_error(500, b"oops"), EngineFailure)
    assert isinstance(upstream_error(401, b"{}"), EngineUnavailable)  # our upstream credentials, not the client's
    bad = upstream_error(400, b'{"error": {"message": "m", "param": "n", "code": 12}}')
    assert isinstance(bad, InvalidRequest) and (bad.param, bad.code, bad.message) == ("n", "12", "m")
    # One mapping for every engine: an upstream's 503 and vLLM's mean the same.
    from serve.vllm_engine import _error_from_vllm

    down = upstream_error(503, b"{}", "4")
    assert isinstance(down, EngineUnavailable) and down.retry_after_s == 4
    assert type(_error_from_vllm(503, "m", None)) is type(down)
    assert type(_error_from_vllm(429, "m", None)) is type(over)


async def test_nothing_names_the_upstream_address(gateway, upstream: str) -> None:  # noqa: ANN001
    _, http = gateway
    auth = {"authorization": f"Bearer {KEY}"}
    ok = await http.post("/v1/chat/completions", headers=auth,
                         json={"model": "proxied", "messages": MSG, "max_tokens": 1})
    models = await http.get("/v1/models", headers=auth)
    dead = await http.post("/v1/chat/completions", headers=auth, json={"model": "dead", "messages": MSG})
    assert ok.headers["x-raygate-model-version"] == "up"
    for r in (ok, models, dead):
        text = r.text + " ".join(r.headers.values())
        assert upstream.split("//")[1] not in text and "127.0.0.1:9" not in text
    leaky = upstream_error(503, b'{"error": {"message": "pool at http://10.1.2.3:8000 exhausted"}}')
    assert "10.1.2.3" not in leaky.message and "503" in leaky.message


def test_openai_engine_needs_upstream() -> None:
    with pytest.raises(ValueError, match="upstream"):
        ModelDeploymentConfig(model="x", engine="openai")
    with pytest.raises(ValueError, match="upstream"):
        ModelDeploymentConfig(model="x", engine="fake", upstream=UpstreamConfig(base_url="http://h/v1"))


async def test_trace_context_reaches_the_upstream(tmp_path) -> None:
    """The upstream gets a traceparent whose parent is the gateway's request span (same trace as the caller)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.app import build_observer
    from gateway.tracing import Tracing

    seen: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    remote = RemoteEngine("traced", "up", UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}/v1"))
    await remote.start()
    exporter = InMemorySpanExporter()
    settings = GatewaySettings(api_keys=[KEY], home=tmp_path)
    gw = create_app(settings, ModelBackend({"traced": remote}),
                    observer=build_observer(settings, Tracing.with_exporter(exporter)))
    trace_id, parent = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://gw") as http:
            r = await http.post("/v1/chat/completions", json={"model": "traced", "messages": MSG},
                                headers={"authorization": f"Bearer {KEY}", "traceparent": f"00-{trace_id}-{parent}-01"})
            assert r.status_code == 200, r.text
    finally:
        await remote.shutdown()
        await server.close()
    root = next(s for s in exporter.get_finished_spans() if s.name.startswith("POST"))
    version, got_trace, got_parent, _flags = seen[0]["traceparent"].split("-")
    assert got_trace == trace_id and got_parent == f"{root.context.span_id:016x}"
