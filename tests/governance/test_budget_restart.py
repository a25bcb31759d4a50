"""Day and month budgets survive a restarted gateway and a restarted Redis: the counters are rebuilt from the
ledger before the next admission is checked (real SQLite and PostgreSQL ledgers, a private redis-server)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.limits import Limits
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine

MSG = [{"role": "user", "content": "one two three four"}]  # the fake engine's prompt: 4 tokens


def _gateway(settings: GatewaySettings) -> Any:
    return create_app(settings, ModelBackend({"fake": FakeEngine("fake", FakeEngineConfig(max_model_len=4096))}))


async def _chat(app: Any, key: str, max_tokens: int) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        return await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                               json={"model": "fake", "messages": MSG, "max_tokens": max_tokens})


async def _stop(app: Any) -> None:
    await app.state.governance.close()  # what the lifespan does: the ledger's last rows are written


@pytest.mark.parametrize("quota", ["local", "redis"])
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
async def test_a_restart_does_not_reset_day_and_month_budgets(tmp_path, private_redis, pg_url, quota, db) -> None:
    redis_url = private_redis.url
    settings = GatewaySettings(
        home=tmp_path, redis_url=redis_url if quota == "redis" else None,
        database_url=pg_url if db == "postgresql" else None, key_secret="s" * 32,
        prompt_token_count="engine",
    )
    first = _gateway(settings)
    record, key = first.state.governance.store.create_key(
        name="budget", team=f"t-{tmp_path.name}", limits=Limits(tokens_per_day=100, tokens_per_month=150))
    first.state.governance.store.set_team(f"t-{tmp_path.name}", Limits(tokens_per_month=1000))
    assert (await _chat(first, key, 56)).status_code == 200  # 4 + 56 = 60 used today
    await _stop(first)
    if quota == "redis":  # this test's own redis-server, restarted: it keeps nothing on disk
        private_redis.stop()
        private_redis.start()

    second = _gateway(settings)
    refused = await _chat(second, key, 40)  # 60 + 4 + 40 > 100: refused, as it would have been without the restart
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota", refused.text
    assert (await _chat(second, key, 30)).status_code == 200  # 60 + 34 = 94
    await _stop(second)
    assert second.state.governance.store.budget_used(key_id=record.id, at=record.created_at)[:2] == (94, 94)


@pytest.mark.parametrize("quota", ["local", "redis"])
async def test_a_restart_does_not_reset_spend_budgets(tmp_path, private_redis, pg_url, quota) -> None:
    """Spend of the day and of all time, rebuilt from the ledger's costs (PostgreSQL: BIGINT sums)."""
    settings = GatewaySettings(
        home=tmp_path, redis_url=private_redis.url if quota == "redis" else None, database_url=pg_url,
        key_secret="s" * 32, prompt_token_count="engine",
        prices={"fake": {"input": 1000, "output": 2000}},  # 0.001 a prompt token, 0.002 a generated one
    )
    first = _gateway(settings)
    record, key = first.state.governance.store.create_key(
        name="spend", limits=Limits(spend_per_day=0.3, spend_total=0.2))
    assert (await _chat(first, key, 56)).status_code == 200  # 4 × 0.001 + 56 × 0.002 = 0.116
    await _stop(first)
    if quota == "redis":
        private_redis.stop()
        private_redis.start()

    second = _gateway(settings)
    refused = await _chat(second, key, 41)  # 0.116 + 0.004 + 0.082 = 0.202 > 0.2 in all
    assert refused.status_code == 429 and "exceeded your spend budget (0.2)" in refused.json()["error"]["message"]
    assert (await _chat(second, key, 40)).status_code == 200  # 0.116 + 0.084 = 0.2: the whole budget, exactly
    await _stop(second)
    assert second.state.governance.store.budget_used(key_id=record.id, at=record.created_at)[2:] == (
        200_000_000, 200_000_000, 200_000_000)
    third = _gateway(settings)
    refused = await _chat(third, key, 1)  # the day's budget has 0.1 left; the all-time one nothing
    assert refused.status_code == 429 and "exceeded your spend budget" in refused.json()["error"]["message"]
    await _stop(third)
