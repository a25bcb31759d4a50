"""However a request ends, its concurrency slot comes back and the quota counters equal the ledger.

Hypothesis draws batches of concurrent requests through the in-process gateway: streams and full
responses, on an engine that answers, one that fails before output, one that fails midway, and one too
slow for `request_timeout_s`; clients that stay, leave after a while, or whose connection resets before the
first byte or midway. When every request has ended: nothing is in flight for the key, every admitted
request has exactly one ledger row, and the key's day counter holds exactly the tokens the ledger charged.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.limits import Limits
from gateway.governance.quota_policy import Subject
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine
from tests.support import asgi_call

ENGINES = {
    "ok": FakeEngineConfig(ttft_ms=5, itl_ms=1),
    "down": FakeEngineConfig(fail_rate=1.0),  # fails before any output
    "midway": FakeEngineConfig(fail_rate=1.0, fail_after_tokens=2, itl_ms=1),  # a stream fails after two tokens
    "slow": FakeEngineConfig(ttft_ms=400, itl_ms=1),  # a full response outlives the timeout
}
LIMITS = Limits(max_concurrent=1000, tokens_per_day=10**12)

requests_st = st.fixed_dictionaries({
    "model": st.sampled_from(sorted(ENGINES)),
    "stream": st.booleans(),
    "endpoint": st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    "max_tokens": st.integers(1, 12),
    "n": st.integers(1, 3),
    "client": st.sampled_from(["stays", "leaves", "reset_at_start", "reset_midway"]),
})


async def _batch(requests: list[dict[str, Any]], home: Path) -> None:
    settings_ = GatewaySettings(home=home, request_timeout_s=0.2)
    app = create_app(settings_, ModelBackend({m: FakeEngine(m, cfg.model_copy()) for m, cfg in ENGINES.items()}))
    gov = app.state.governance
    record, key = gov.store.create_key(name="p", limits=LIMITS)
    auth = {"authorization": f"Bearer {key}"}

    async def one(r: dict[str, Any]) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"model": r["model"], "stream": r["stream"], "max_tokens": r["max_tokens"], "n": r["n"]}
        if r["endpoint"] == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "a b c"}]
        else:
            body["prompt"] = "a b c"
        client = r["client"]
        return await asgi_call(
            app, r["endpoint"], body, auth, leave_after_s=0.05 if client == "leaves" else None,
            sends_before_reset={"reset_at_start": 0, "reset_midway": 2}.get(client),
        )

    await asyncio.gather(*(one(r) for r in requests))
    await gov.ledger.flush()
    used = await gov.limiter.used(Subject(f"key:{record.id}", LIMITS))
    assert used[2] == 0, "a concurrency slot outlived its request"
    rows = gov.store.usage_summary(key_id=record.id)
    assert sum(row["requests"] for row in rows) == len(requests), "a request has no ledger row, or two"
    assert used[3] == sum(row["total_tokens"] for row in rows), "the day counter disagrees with the ledger"
    await gov.close()


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(requests=st.lists(requests_st, min_size=1, max_size=6))
def test_every_request_settles_once_however_it_ends(requests: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as home:
        asyncio.run(_batch(requests, Path(home)))
