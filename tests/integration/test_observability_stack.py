"""Metrics, traces and logs of the real stack (Serve replica, HAProxy, vLLM on the tiny model)."""

from __future__ import annotations

import glob
import time

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
PROMPT = "observability probe 93kd"


def _scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    out = {}
    for family in text_string_to_metric_families(httpx.get(url, headers=headers, timeout=10).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all((k, w) in lab for k, w in labels.items()))


def test_metrics_traces_and_logs_after_traffic(stack) -> None:
    auth = {"authorization": f"Bearer {stack.key}"}
    before = _scrape(stack.base_url + "/metrics", stack.admin_key)
    ray_metrics = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    generated_before = _total(_scrape(ray_metrics), "ray_vllm_generation_tokens_total")
    sent, tokens, rids = 0, 0, []
    with httpx.Client(base_url=stack.base_url, timeout=120) as c:
        for i in range(4):
            stream = i % 2 == 1
            headers = {**auth, "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"} if i == 0 else auth
            body = {"model": stack.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
                    "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            r = c.post("/v1/chat/completions", headers=headers, json=body)
            assert r.status_code == 200, r.text
            rids.append(r.headers["x-request-id"])
            if stream:
                usage = [orjson.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")][-1]["usage"]
            else:
                usage = r.json()["usage"]
            tokens += usage["completion_tokens"]
            sent += 1
        assert c.post("/v1/chat/completions", headers={"authorization": "Bearer rg-bogus-key-000000"},
                      json={"model": stack.model, "messages": []}).status_code == 401
    after = _scrape(stack.base_url + "/metrics", stack.admin_key)

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    assert delta("raygate_requests_total", model=stack.model, status="200") == sent
    assert delta("raygate_requests_total", status="401") == 1
    assert delta("raygate_completion_tokens_total", model=stack.model) == tokens
    assert delta("raygate_time_to_first_token_seconds_count", model=stack.model) == 2
    assert delta("raygate_request_duration_seconds_count", model=stack.model) == sent
    assert _total(after, "raygate_requests_in_flight") == 0
    version = next(dict(lab)["version"] for (n, lab) in after if n == "raygate_requests_total"
                   and dict(lab).get("model") == stack.model and dict(lab).get("version"))
    assert version.startswith(stack.model + "@")

    # The caller's trace continues in the replica; spans leave over OTLP.
    deadline = time.monotonic() + 30
    root = None
    while root is None and time.monotonic() < deadline:
        root = next((s for s in stack.otlp.spans() if s["trace_id"] == TRACE_ID and s["parent_id"] == PARENT_ID),
                    None)
        time.sleep(0.2)
    assert root is not None, stack.otlp.spans()[-5:]
    assert root["service"] == "raygate-test" and root["name"] == "POST /v1/chat/completions"
    assert root["attributes"]["raygate.request_id"] == rids[0]
    children = {s["name"] for s in stack.otlp.spans() if s["parent_id"] == root["span_id"]}
    assert children == {"auth", "routing", "quota", "time_to_first_token", "completion"}

    # Ray's metrics export (set port): Serve's and vLLM's own series.
    deadline = time.monotonic() + 60
    names: set[str] = set()
    generated = 0.0
    while time.monotonic() < deadline:
        ray_samples = _scrape(ray_metrics)
        names = {n for n, _ in ray_samples}
        # vLLM's per-step counters reach Ray through the replica's buffer (serve/engine_metrics.py).
        generated = _total(ray_samples, "ray_vllm_generation_tokens_total") - generated_before
        if (any(n.startswith("ray_serve_") for n in names) and "ray_vllm_time_to_first_token_seconds_count" in names
                and generated >= tokens):
            break
        time.sleep(2)
    assert generated >= tokens, (generated, tokens)
    assert any(n.startswith("ray_serve_") for n in names), sorted(names)[:40]
    assert "ray_vllm_time_to_first_token_seconds_count" in names, sorted(n for n in names if "vllm" in n)
    # vLLM's per-token histogram is left out of Ray's export (the agent replays each observation).
    assert not any(n.startswith("ray_vllm_inter_token_latency") for n in names)

    # Replica logs: JSON lines, the access line carries the response's request id; no key, no prompt.
    deadline = time.monotonic() + 20
    docs: list[dict] = []
    while time.monotonic() < deadline:
        docs = []
        text = ""
        for path in glob.glob("/tmp/ray/session_latest/logs/serve/replica_raygate_gateway_*.log"):
            with open(path) as f:
                chunk = f.read()
            text += chunk
            docs += [orjson.loads(line) for line in chunk.splitlines() if line.startswith("{")]
        if all(any(d.get("request_id") == rid and d.get("message") == "request" for d in docs) for rid in rids):
            break
        time.sleep(0.5)
    access = {d["request_id"]: d for d in docs if d.get("message") == "request"}
    assert set(rids) <= set(access), sorted(access)[-5:]
    assert access[rids[0]]["status"] == 200 and access[rids[0]]["model"] == stack.model
    assert stack.key not in text and PROMPT not in text
