"""Spans (in-memory exporter), JSON logs and the access log of the gateway on the fake engine."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import httpx
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import create_app
from gateway.app import build_observer
from gateway.backend import ModelBackend
from gateway.logs import JsonFormatter, configure
from gateway.observe import slo_met
from gateway.settings import GatewaySettings
from gateway.tracing import Tracing, root_bound
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine

KEY = "test-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
PROMPT = "the secret prompt text 7f3a"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _app(tmp_path, tracing: Tracing | None = None, **settings):
    s = GatewaySettings(api_keys=[KEY], home=tmp_path, **settings)
    engines = {"fake": FakeEngine("fake", FakeEngineConfig(itl_ms=2)),
               "broken": FakeEngine("broken", FakeEngineConfig(fail_rate=1.0))}
    backend = ModelBackend(engines, aliases={})
    return create_app(s, backend, observer=build_observer(s, tracing))


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_span_tree_with_caller_parent(tmp_path) -> None:
    exporter = InMemorySpanExporter()
    app = _app(tmp_path, Tracing.with_exporter(exporter))
    async with _client(app) as http:
        r = await http.post("/v1/chat/completions", headers={**AUTH, "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                            json={"model": "fake", "messages": [{"role": "user", "content": PROMPT}],
                                  "max_tokens": 4, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans.pop("POST /v1/chat/completions")
    assert f"{root.context.trace_id:032x}" == TRACE_ID  # continues the caller's trace
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID
    assert root.attributes["gen_ai.usage.output_tokens"] == 4
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["raygate.request_id"] == r.headers["x-request-id"]
    assert set(spans) == {"auth", "routing", "quota", "time_to_first_token", "completion"}
    for child in spans.values():
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    order = sorted(spans.values(), key=lambda s: s.start_time)
    assert [s.name for s in order] == ["auth", "routing", "quota", "time_to_first_token", "completion"]
    assert spans["completion"].end_time - spans["completion"].start_time >= 2_000_000  # 3 gaps of 2 ms
    assert not any(PROMPT in str(s.attributes) for s in exporter.get_finished_spans())


async def test_refused_request_has_a_root_span_only_up_to_where_it_stopped(tmp_path) -> None:
    exporter = InMemorySpanExporter()
    app = _app(tmp_path, Tracing.with_exporter(exporter))
    async with _client(app) as http:
        r = await http.post("/v1/chat/completions", headers={"authorization": "Bearer nope-nope-nope-nope"},
                            json={"model": "fake", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401
        r = await http.post("/v1/chat/completions", headers=AUTH,
                            json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 500 or r.status_code == 503
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert [s.attributes["http.response.status_code"] for s in roots] == [401, r.status_code]
    assert roots[1].status.status_code.name == "ERROR"
    names = sorted(s.name for s in exporter.get_finished_spans() if s.parent is not None)
    assert names == ["auth", "quota", "routing"]  # the 401 ended before its auth span closed


async def test_tracing_off_by_default(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert not Tracing.create().enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert Tracing.create().enabled
    assert not Tracing.create("none").enabled
    with pytest.raises(ValueError):
        Tracing.create("zipkin-v0")


async def test_json_logs_and_access_log_carry_the_request_id_never_the_key_or_prompt(tmp_path) -> None:
    out = io.StringIO()
    handler = configure(out)
    try:
        app = _app(tmp_path, access_log=True)
        async with _client(app) as http:
            ok = await http.post("/v1/chat/completions", headers=AUTH,
                                 json={"model": "fake", "messages": [{"role": "user", "content": PROMPT}],
                                       "max_tokens": 2})
            bad = await http.post("/v1/chat/completions", headers={**AUTH, "x-request-id": "caller-rid-1"},
                                  json={"model": "broken", "messages": [{"role": "user", "content": PROMPT}]})
        deadline = time.monotonic() + 5
        while out.getvalue().count('"message":"request"') < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        for name in ("gateway", "serve", "models"):
            logging.getLogger(name).removeHandler(handler)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    access = [d for d in lines if d["logger"] == "gateway.access"]
    # Our id everywhere (the engine, the ledger, the logs); the caller's is kept beside it, never used as ours.
    assert [(d["request_id"], d["client_request_id"], d["status"]) for d in access] == [
        (ok.headers["x-request-id"], None, 200), (access[1]["request_id"], "caller-rid-1", bad.status_code)
    ]
    assert len(access[1]["request_id"]) == 32
    assert access[0]["completion_tokens"] == 2 and access[0]["key_id"].startswith("static:")
    text = out.getvalue()
    assert KEY not in text and PROMPT not in text
    assert any(d["logger"] != "gateway.access" and d.get("request_id") == access[1]["request_id"] for d in lines)


def test_json_formatter_shape() -> None:
    record = logging.LogRecord("gateway.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.model = "m"
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["message"] == "hello you" and doc["level"] == "WARNING" and doc["model"] == "m"


@pytest.mark.parametrize(
    ("ttft", "tpot", "e2e", "tokens", "met"),
    [
        (0.5, 0.05, 9.0, 100, True),
        (1.5, 0.05, 9.0, 100, False),  # first token too late
        (0.5, 0.2, 9.0, 100, False),  # too slow per token
        (0.5, None, 0.5, 1, True),  # one token: no gaps to measure
        (None, None, 5.0, 50, True),  # full response: 1 + 0.1 * 49 = 5.9 s allowed
        (None, None, 6.0, 50, False),
    ],
)
def test_slo_policy(ttft, tpot, e2e, tokens, met) -> None:
    assert slo_met(ttft, tpot, e2e, tokens, ttft_target_s=1.0, tpot_target_s=0.1) is met


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_quota_store_down_is_counted(tmp_path, mode) -> None:
    """Redis unreachable: fail_open admits and counts it, fail_closed refuses with 503 and counts that."""
    from prometheus_client.parser import text_string_to_metric_families

    admin = "admin-key-0123456789abcdef"
    s = GatewaySettings(api_keys=[KEY], home=tmp_path, admin_key=admin, redis_url="redis://127.0.0.1:9/0",
                        quota_failure_mode=mode, quota_timeout_s=0.2)
    backend = ModelBackend({"fake": FakeEngine("fake", FakeEngineConfig())}, aliases={})
    app = create_app(s, backend, observer=build_observer(s, Tracing()))
    async with _client(app) as http:
        r = await http.post("/admin/keys", headers={"authorization": f"Bearer {admin}"},
                            json={"name": "limited", "limits": {"rpm": 5}})
        assert r.status_code == 201, r.text
        limited = {"authorization": f"Bearer {r.json()['key']}"}
        codes = [(await http.post("/v1/chat/completions", headers=limited, json={
            "model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})).status_code
            for _ in range(2)]
        text = (await http.get("/metrics", headers={"authorization": f"Bearer {admin}"})).text
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for f in text_string_to_metric_families(text) for x in f.samples}
    if mode == "fail_open":
        assert codes == [200, 200]
        assert samples[("raygate_quota_unchecked_admissions_total", ())] == 2
    else:
        assert codes == [503, 503]
        assert samples[("raygate_quota_rejections_total", (("kind", "unavailable"),))] == 2
        assert samples[("raygate_requests_total", (("endpoint", "chat"), ("model", "fake"), ("status", "503"),
                                                   ("tier", "default"), ("version", "")))] == 2


@pytest.mark.parametrize("env", [
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.3"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    {"OTEL_TRACES_SAMPLER": "always_on"},
    {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    {},  # the default, parentbased_always_on
])
def test_new_trace_sampling_is_the_sdks_decision(monkeypatch, env) -> None:
    """The request path decides a new trace without the SDK's sampler call; it must decide exactly as the SDK."""
    import random

    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tr = Tracing([SimpleSpanProcessor(InMemorySpanExporter())])
    assert tr._root_bound is not None  # these samplers take the short path
    assert root_bound(object()) is None  # any other sampler is asked as usual
    random.seed(7)
    for _ in range(3000):
        ctx, parent = tr.start({}, "/v1/chat/completions")
        sdk = tr.sampler.should_sample(None, ctx.trace_id, "x", SpanKind.SERVER).decision.is_sampled()
        assert ctx.trace_flags.sampled is sdk and parent is None
    # With a caller's traceparent the SDK's sampler decides (parent-based): an unsampled parent stays unsampled.
    ctx, parent = tr.start({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"}, "/v1/chat/completions")
    assert parent is not None and ctx.trace_id == parent.trace_id
    if env.get("OTEL_TRACES_SAMPLER", "parentbased").startswith("parentbased"):
        assert not ctx.trace_flags.sampled
