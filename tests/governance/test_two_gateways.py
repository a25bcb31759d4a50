"""Two gateway processes sharing Redis and PostgreSQL, over real HTTP.

Each process is `raygate gateway` (uvicorn, the fake engine in-process): what is under test
is governance across processes, which is the same code in a Serve replica.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.governance.alerts import signature
from tests.support import WebhookReceiver, free_port, wait_until

ADMIN = "rg-admin-test-0123456789abcdefghij"
SECRET = "test-secret-0123456789abcdef"
MSG = [{"role": "user", "content": "hello"}]
HOOK_SECRET = "hook-secret-0123456789"


class Gateways:
    def __init__(self, urls: list[str], logs: list[Path], hook: WebhookReceiver) -> None:
        self.urls = urls
        self.logs = logs
        self.hook = hook  # where budget alerts go

    def admin(self, method: str, path: str, i: int = 0, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.urls[i] + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10, **kw)

    def new_key(self, **spec: Any) -> tuple[str, str]:
        r = self.admin("POST", "/admin/keys", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["key"]


def _start(cfg: Path, port: int, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "raygate.cli", "gateway", "--config", str(cfg), "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture
def gateways(tmp_path: Path, redis_url: str, pg_url: str) -> Iterator[Gateways]:
    hook = WebhookReceiver()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"settings": {
            "home": str(tmp_path), "database_url": pg_url, "redis_url": redis_url, "rate_window_s": 4,
            # fake-a: a prompt token costs 0.001, a generated one 0.002 (per million: 1000 and 2000)
            "prices": {"fake-a": {"input": 1000, "cached_input": 500, "output": 2000}},
            "budget_alert_webhook": hook.url, "budget_alert_thresholds": [0.5, 1.0], "budget_alert_secret": HOOK_SECRET,
            "routes": {"chat": {"targets": [{"model": "fake-a", "weight": 1}], "fallbacks": ["fake-b"]},
                       "safe": {"targets": [{"model": "broken"}], "fallbacks": ["fake-b"]}},
        }},
        "serve": {"models": [
            {"model": "fake-a", "engine": "fake", "fake": {"itl_ms": 1, "fail_rate": 0.0}},
            {"model": "fake-b", "engine": "fake", "fake": {"itl_ms": 1}},
            {"model": "slow", "engine": "fake", "fake": {"ttft_ms": 1500}},
            {"model": "broken", "engine": "fake", "fake": {"fail_rate": 1.0}},
        ]},
    }))
    metrics_dir = tmp_path / "metrics"  # both processes pool their Prometheus samples here
    metrics_dir.mkdir()
    env = {**os.environ, "RAYGATE_ADMIN_KEY": ADMIN, "RAYGATE_KEY_SECRET": SECRET,
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"gw{i}.log" for i in range(2)]
    procs = [_start(cfg, p, log, env) for p, log in zip(ports, logs)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url, proc, log in zip(urls, procs, logs):
            _wait(url, proc, log)
        yield Gateways(urls, logs, hook)
    finally:
        hook.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        from sqlalchemy import create_engine, text

        eng = create_engine(pg_url)
        with eng.begin() as c:
            c.execute(text("TRUNCATE api_keys, teams, usage"))
        eng.dispose()


async def _burst(g: Gateways, key: str, n: int, body: dict[str, Any] | None = None) -> list[httpx.Response]:
    """n requests released at once, alternating between the two processes."""
    go = asyncio.Event()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as client:

        async def one(i: int) -> httpx.Response:
            await go.wait()
            return await client.post(
                g.urls[i % 2] + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                json=body or {"model": "fake-a", "messages": MSG, "max_tokens": 4},
            )

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.2)
        go.set()
        return await asyncio.gather(*tasks)


def _codes(rs: list[httpx.Response]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in rs:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


def _align_to_window(window_s: float = 4.0, need_s: float = 2.5) -> None:
    """Start a burst early in a rate window so it cannot straddle two."""
    left = window_s - time.time() % window_s
    if left < need_s:
        time.sleep(left + 0.05)


async def test_rpm_barrier_across_two_processes(gateways: Gateways) -> None:
    _, key = gateways.new_key(limits={"rpm": 10})
    _align_to_window()
    rs = await _burst(gateways, key, 50)
    assert _codes(rs) == {200: 10, 429: 40}
    for url in gateways.urls:  # each process got 25: with counters of its own it would admit 10 of them
        mine = [r for r in rs if str(r.request.url).startswith(url)]
        assert len(mine) == 25 and sum(r.status_code == 429 for r in mine) >= 15
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"


async def test_tpm_reservation_across_two_processes(gateways: Gateways) -> None:
    _, key = gateways.new_key(limits={"tpm": 1000})
    _align_to_window()
    # each request reserves its prompt estimate (4 + 1 + 2 = 7) + max_tokens 93 = 100 tokens
    rs = await _burst(gateways, key, 50, {"model": "fake-a", "messages": MSG, "max_tokens": 93})
    assert _codes(rs) == {200: 10, 429: 40}
    assert all(r.json()["error"]["type"] == "tokens" for r in rs if r.status_code == 429)


async def test_concurrency_cap_across_two_processes(gateways: Gateways) -> None:
    _, key = gateways.new_key(limits={"max_concurrent": 5})
    rs = await _burst(gateways, key, 50, {"model": "slow", "messages": MSG, "max_tokens": 2})
    assert _codes(rs) == {200: 5, 429: 45}
    await asyncio.sleep(0.2)  # slots are released just after each response is sent
    again = await _burst(gateways, key, 5, {"model": "fake-a", "messages": MSG, "max_tokens": 2})
    assert _codes(again) == {200: 5}  # every slot came back


async def test_budget_across_two_processes(gateways: Gateways) -> None:
    _, key = gateways.new_key(limits={"tokens_per_day": 1000})
    rs = await _burst(gateways, key, 50, {"model": "fake-a", "messages": MSG, "max_tokens": 93})
    assert _codes(rs) == {200: 10, 429: 40}
    refused = [r for r in rs if r.status_code == 429]
    assert all(r.json()["error"]["type"] == "insufficient_quota" for r in refused)
    assert all(r.headers["x-should-retry"] == "false" for r in refused)


async def test_spend_budget_across_two_processes(gateways: Gateways) -> None:
    """50 requests at once through both processes against a daily spend budget that holds exactly 10 of their
    reservations (prompt estimate 7 × 0.001 + max_tokens 93 × 0.002 = 0.193): exactly 10 run, the ledger's cost is
    theirs, and the alert webhook hears once of each threshold (half the budget; the budget refusing) however many
    requests crossed it in either process."""
    key_id, key = gateways.new_key(limits={"spend_per_day": 1.93})
    body = {"model": "fake-a", "messages": MSG, "max_tokens": 93, "user": "end-user-7"}
    rs = await _burst(gateways, key, 50, body)
    assert _codes(rs) == {200: 10, 429: 40}
    refused = [r for r in rs if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert "daily spend budget (1.93)" in refused[0].json()["error"]["message"]
    path = f"/admin/usage?key_id={key_id}&group_by=key_id,end_user"
    # each process writes its ledger rows within a second (the admin call flushes only its own process's)
    assert wait_until(lambda: gateways.admin("GET", path).json()["totals"]["requests"] == 10, 10, every_s=0.2)
    usage = gateways.admin("GET", path).json()
    (row,) = usage["data"]
    # the fake engine counts the prompt as 1 token: each request settles to 0.001 + 93 × 0.002
    assert row["end_user"] == "end-user-7" and row["requests"] == 10 and row["cost_nanos"] == 10 * 187_000_000
    assert usage["totals"]["cost"] == 1.87 and usage["currency"] == "USD"
    budget = gateways.admin("GET", f"/admin/keys/{key_id}/budget").json()
    assert budget["key"]["spend_day"] == {"limit": 1.93, "used": 1.87, "unit": "USD"}
    assert wait_until(lambda: len(gateways.hook.received) >= 2, 10, every_s=0.1), gateways.hook.received
    await asyncio.sleep(0.5)  # an alert sent twice would have arrived by now (a negative: nothing to poll for)
    alerts = sorted((a["threshold"], a["budget"], a["key"]) for a in gateways.hook.received)
    assert alerts == [(0.5, "spend_day", key_id), (1.0, "spend_day", key_id)], gateways.hook.received
    for headers, body in gateways.hook.raw:  # signed: the receiver can tell the gateway's posts from others'
        assert headers["x-raygate-signature"] == "sha256=" + signature(HOOK_SECRET.encode(), body)


def test_header_sequence_counts_down_then_429_then_admits_again(gateways: Gateways) -> None:
    _, key = gateways.new_key(limits={"rpm": 3, "tpm": 10_000})
    _align_to_window(need_s=3)
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": "fake-a", "messages": MSG, "max_tokens": 4}
    remaining = []
    for i in range(3):
        r = httpx.post(gateways.urls[i % 2] + "/v1/chat/completions", headers=auth, json=body)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-limit-tokens"] == "10000"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    r = httpx.post(gateways.urls[1] + "/v1/chat/completions", headers=auth, json=body)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 4
    time.sleep(int(r.headers["retry-after"]))
    r = httpx.post(gateways.urls[0] + "/v1/chat/completions", headers=auth, json=body)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "2"


def test_revocation_reaches_the_other_process_within_a_second(gateways: Gateways) -> None:
    key_id, key = gateways.new_key(name="short-lived")
    auth = {"authorization": f"Bearer {key}"}
    for url in gateways.urls:  # both processes have it cached
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
    assert gateways.admin("POST", f"/admin/keys/{key_id}/revoke", i=0).status_code == 200
    t0 = time.monotonic()
    while httpx.get(gateways.urls[1] + "/v1/models", headers=auth).status_code != 401:
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.02)
    unknown = httpx.get(gateways.urls[1] + "/v1/models", headers={"authorization": "Bearer rg-not-a-key"})
    revoked = httpx.get(gateways.urls[1] + "/v1/models", headers=auth)
    assert unknown.json() == revoked.json()  # the same 401 body


def test_model_allow_list_routes_fallback_and_usage(gateways: Gateways) -> None:
    key_id, key = gateways.new_key(allowed_models=["chat"], tier="premium")
    auth = {"authorization": f"Bearer {key}"}
    r = httpx.post(gateways.urls[0] + "/v1/chat/completions", headers=auth,
                   json={"model": "fake-b", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"  # as if it did not exist
    r = httpx.post(gateways.urls[0] + "/v1/chat/completions", headers=auth,
                   json={"model": "chat", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "fake-a"
    usage = gateways.admin("GET", f"/admin/usage?key_id={key_id}", i=0).json()["data"]
    assert [(u["model"], u["requests"], u["errors"]) for u in usage] == [("chat", 1, 0)]
    assert usage[0]["completion_tokens"] == 2


def test_admin_api_refuses_user_keys(gateways: Gateways) -> None:
    _, key = gateways.new_key()
    r = httpx.get(gateways.urls[0] + "/admin/keys", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 401
    listing = gateways.admin("GET", "/admin/keys").json()["data"]
    assert all("key" not in k and "key_hash" not in k for k in listing)
    for log in gateways.logs:
        assert key not in log.read_text()


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(
        httpx.get(url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).text
    ):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all((k, w) in lab for k, w in labels.items()))


async def test_metrics_add_up_across_two_processes(gateways: Gateways) -> None:
    """Traffic spread over two processes; one scrape of either reports all of it."""
    key_id, key = gateways.new_key(tier="premium", limits={"rpm": 6})
    _align_to_window()
    rs = await _burst(gateways, key, 8)
    assert _codes(rs) == {200: 6, 429: 2}
    other_id, other = gateways.new_key()
    async with httpx.AsyncClient(timeout=30) as c:
        for _ in range(3):  # streams on the second process, through a route whose first target is down
            r = await c.post(gateways.urls[1] + "/v1/chat/completions", headers={"authorization": f"Bearer {other}"},
                       json={"model": "safe", "messages": MSG, "max_tokens": 5, "stream": True})
            assert r.status_code == 200 and "data: [DONE]" in r.text
        wrong = await c.post(gateways.urls[0] + "/v1/chat/completions", headers={"authorization": "Bearer rg-wrong-key"},
                             json={"model": "fake-a", "messages": MSG})
        assert wrong.status_code == 401
    def check(m: dict) -> None:
        assert _total(m, "raygate_requests_total", tier="premium", status="200", model="fake-a") == 6
        assert _total(m, "raygate_requests_total", tier="premium", status="429") == 2
        assert _total(m, "raygate_requests_total", tier="default", status="200", model="safe") == 3
        assert _total(m, "raygate_requests_total", status="401") == 1
        assert _total(m, "raygate_quota_rejections_total", kind="requests") == 2
        assert _total(m, "raygate_fallbacks_total", model="safe", target="fake-b") == 3
        assert _total(m, "raygate_completion_tokens_total", model="fake-a") == 6 * 4
        assert _total(m, "raygate_completion_tokens_total", model="safe") == 3 * 5
        assert _total(m, "raygate_time_to_first_token_seconds_count", model="safe") == 3
        assert _total(m, "raygate_inter_token_latency_seconds_count", model="safe") == 3
        assert _total(m, "raygate_request_duration_seconds_count") == 9
        assert _total(m, "raygate_request_duration_seconds_bucket", le="+Inf") == 9
        assert _total(m, "raygate_requests_in_flight") == 0
        # Keys get SLO series of their own only on `metrics_key_ids`: a client cannot grow /metrics.
        assert _total(m, "raygate_slo_requests_total", key="other") == 6 + 3
        assert _total(m, "raygate_slo_requests_total", key=key_id) == _total(m, "raygate_slo_requests_total",
                                                                             key=other_id) == 0

    # Each process writes its samples at least once a second; then either scrape reports all of them.
    for url in gateways.urls:
        deadline = time.monotonic() + 5
        while True:
            try:
                check(_samples(url))
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def test_redis_restarted_under_load_across_two_processes(gateways: Gateways, private_redis: Any) -> None:
    """Redis stops and comes back while both processes take traffic: every answer is a 200 or, while it is
    down, the configured policy's 503 envelope with Retry-After (fail_closed, the default), never a 500 nor a
    hang; traffic succeeds again once it is back, and the limits are exact again."""
    _, key = gateways.new_key(limits={"rpm": 100_000, "max_concurrent": 50, "tokens_per_day": 10**9})
    auth = {"authorization": f"Bearer {key}"}
    answers: list[tuple[float, int, str]] = []  # (time, status, error code)
    stop = asyncio.Event()

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(gateways.urls[i % 2] + "/v1/chat/completions", headers=auth,
                                  json={"model": "fake-a", "messages": MSG, "max_tokens": 2, "stream": i % 3 == 0})
            code = r.json()["error"]["code"] if r.status_code >= 400 else ""
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
            answers.append((time.monotonic(), r.status_code, code))

    async with httpx.AsyncClient(timeout=10) as client:
        workers = [asyncio.create_task(worker(i, client)) for i in range(6)]
        await asyncio.sleep(1.0)
        down_at = time.monotonic()
        private_redis.stop()
        await asyncio.sleep(1.5)
        private_redis.start()  # the same port, empty
        back_at = time.monotonic()
        deadline = back_at + 15
        while not any(t > back_at and s == 200 for t, s, _ in answers[-6:]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        recovered_at = next((t for t, s, _ in answers if t > back_at and s == 200), None)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
    statuses = {(s, c) for _, s, c in answers}
    assert statuses <= {(200, ""), (503, "quota_unavailable")}, statuses
    assert any(s == 503 for t, s, _ in answers if down_at < t < back_at), "Redis was down and nothing noticed"
    assert recovered_at is not None and recovered_at - back_at < 5, "traffic did not come back with Redis"
    assert all(s == 200 for t, s, _ in answers if t > recovered_at + 0.5)
    # Exact again: a fresh key's rpm holds across both processes on the restarted Redis.
    _, fresh = gateways.new_key(limits={"rpm": 5})
    _align_to_window()
    assert _codes(await _burst(gateways, fresh, 12)) == {200: 5, 429: 7}
