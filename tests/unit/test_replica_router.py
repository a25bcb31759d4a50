"""Conversation routing glue: Serve's request router, HAProxy's route call, the replica header (no Ray cluster)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.builder import deployment_options
from gateway.config import AppConfig
from gateway.deployment import with_header
from gateway.routing.affinity import conversation_key, rank_replicas
from gateway.routing.replica_router import ConversationRequestRouter, pick_replica
from serve.autoscaling_policy import KV_CACHE_USAGE_STAT
from serve.engine import IN_FLIGHT_STAT, EngineStats, routing_stats


def _replica(uid: str, in_flight: int | None, kv: float | None = None) -> Any:
    stats = {} if in_flight is None else {IN_FLIGHT_STAT: in_flight}
    if kv is not None:
        stats[KV_CACHE_USAGE_STAT] = kv
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid), routing_stats=stats)


def _router(gap: int, max_kv: float | None = None) -> ConversationRequestRouter:
    router = object.__new__(ConversationRequestRouter)  # the policy part needs no Serve state
    router.initialize_state(max_load_gap=gap, max_kv_cache_usage=max_kv)
    return router


def _pending(session: str, request_id: str = "rid-1") -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(session_id=session, internal_request_id=request_id))


async def test_request_router_ranks_by_the_policy_one_replica_per_rank() -> None:
    replicas = [_replica(f"r{i}", 0) for i in range(3)]
    ranks = await _router(4).choose_replicas(replicas, _pending("m:conv"))
    assert all(len(rank) == 1 for rank in ranks)
    assert [r[0].replica_id.unique_id for r in ranks] == rank_replicas("m:conv", dict.fromkeys(["r0", "r1", "r2"], 0), 4)


async def test_request_router_passes_over_a_busy_replica_and_reads_missing_stats_as_idle() -> None:
    home = rank_replicas("m:conv", dict.fromkeys(["r0", "r1"], 0), 2)[0]
    replicas = [_replica("r0", 9 if home == "r0" else None), _replica("r1", 9 if home == "r1" else None)]
    ranks = await _router(2).choose_replicas(replicas, _pending("m:conv"))
    assert ranks[0][0].replica_id.unique_id != home and ranks[1][0].replica_id.unique_id == home


async def test_request_router_passes_over_a_replica_whose_kv_cache_is_full() -> None:
    home = rank_replicas("m:conv", dict.fromkeys(["r0", "r1"], 0), 16)[0]
    other = "r1" if home == "r0" else "r0"
    replicas = [_replica(home, 1, kv=0.95), _replica(other, 1, kv=0.2)]
    ranks = await _router(16, max_kv=0.9).choose_replicas(replicas, _pending("m:conv"))
    assert [r[0].replica_id.unique_id for r in ranks] == [other, home]
    ranks = await _router(16, max_kv=None).choose_replicas(replicas, _pending("m:conv"))  # requests alone
    assert ranks[0][0].replica_id.unique_id == home


def test_a_replica_reports_its_requests_in_flight_and_its_fullest_kv_cache() -> None:
    def engine(busy: int, kv: float) -> Any:
        return SimpleNamespace(busy=lambda: busy, stats=lambda: EngineStats(running=busy, kv_cache_usage=kv))

    assert routing_stats([engine(2, 0.4), engine(3, 0.7)]) == {IN_FLIGHT_STAT: 5, KV_CACHE_USAGE_STAT: 0.7}
    assert routing_stats(iter([engine(1, 0.2)])) == {IN_FLIGHT_STAT: 1, KV_CACHE_USAGE_STAT: 0.2}  # any iterable
    assert routing_stats([]) == {IN_FLIGHT_STAT: 0, KV_CACHE_USAGE_STAT: 0.0}


async def test_request_router_without_a_key_spreads_by_request_id() -> None:
    replicas = [_replica(f"r{i}", 0) for i in range(2)]
    firsts = {(await _router(4).choose_replicas(replicas, _pending("", f"rid-{i}")))[0][0].replica_id.unique_id
              for i in range(40)}
    assert firsts == {"r0", "r1"}
    assert await _router(4).choose_replicas([], _pending("x")) == []


@dataclass
class _Handle:
    """A DeploymentHandle stand-in: records the session each pick was asked with."""

    sessions: list[str | None] = field(default_factory=list)
    session: str | None = None

    def options(self, session_id: str) -> _Handle:
        return _Handle(self.sessions, session_id)

    @contextlib.asynccontextmanager
    async def choose_replica(self, _reserve: bool = True) -> AsyncIterator[Any]:
        assert _reserve is False  # HAProxy forwards the request itself: nothing is reserved
        self.sessions.append(self.session)
        full = SimpleNamespace(to_full_id_str=lambda: "SERVE_REPLICA::raygate#gateway#abc")
        yield SimpleNamespace(_replica=SimpleNamespace(replica_id=full))


@pytest.mark.parametrize(("body", "session"), [
    (b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', None),
    (b'{"model":"m","prompt":"once upon"}', "s-1"),
    (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"prompt_cache_key":"t"}', "s-1"),
    (b'{"model":"m","messages":[{"role":"us', None),  # cut short by HAProxy's buffer
    (b"", None), (b"[1, 2]", None), (b"\xff\xfe", None),
])
async def test_pick_replica_asks_with_the_conversation_key(body: bytes, session: str | None) -> None:
    handle = _Handle()
    assert await pick_replica(handle, body, session) == "SERVE_REPLICA::raygate#gateway#abc"  # type: ignore[arg-type]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    assert handle.sessions == [conversation_key(doc if isinstance(doc, dict) else None, session)]


async def test_replica_header_on_every_response_and_nothing_else_changed() -> None:
    inner = Starlette(routes=[Route("/x", lambda _: PlainTextResponse("ok", headers={"x-a": "1"}))])
    app = with_header(inner, b"x-raygate-replica", b"abc")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path in ("/x", "/missing"):
            r = await c.get(path)
            assert r.headers["x-raygate-replica"] == "abc"
        assert r.status_code == 404
        ok = await c.get("/x")
        assert ok.text == "ok" and ok.headers["x-a"] == "1"


def test_deployment_options_name_the_request_router_only_when_enabled() -> None:
    base = {"serve": {"models": [{"model": "m", "engine": "fake"}]}}
    assert "request_router_config" not in deployment_options(AppConfig.load(base))
    cfg = AppConfig.load({**base, "gateway": {"conversation_routing": {"enabled": True, "max_load_gap": 3,
                                                                        "stats_period_s": 0.5}}})
    rc = deployment_options(cfg)["request_router_config"]
    assert rc.request_router_kwargs == {"max_load_gap": 3, "max_kv_cache_usage": 0.9}
    assert rc.request_routing_stats_period_s == 0.5
    assert rc.request_router_class == "gateway.routing.replica_router:ConversationRequestRouter"
