"""A model in a deployment of its own: coalesced streams, errors across the handle, the gateway's mirror, config.

The handle here is an in-process stand-in that calls a real `ModelServer` on the fake
engine (the real Serve path is tests/integration/test_deployment_placement.py).
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from gateway.backend import ModelBackend, build_backend
from gateway.builder import (
    PREFIX_TREE_KEEP_CHARS,
    PREFIX_TREE_MAX_CHARS,
    deployment_options,
    model_deployment_name,
    model_options,
)
from gateway.config import AppConfig
from gateway.routing.affinity import conversation_key
from serve.coalesce import coalesce
from serve.config import ModelDeploymentConfig, ServeConfig
from serve.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    from_wire,
    to_wire,
)
from serve.handle_engine import HandleEngine, HandleModel, PromptBody, handle_error
from serve.model_deployment import ModelServer


async def _timed(events: list[tuple[float, bytes]], fail: Exception | None = None) -> AsyncIterator[bytes]:
    start = time.monotonic()
    for at, event in events:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        yield event
    if fail is not None:
        raise fail


def test_coalesce_sends_the_first_event_at_once_then_batches_by_window() -> None:
    async def run() -> list[tuple[float, bytes]]:
        start = time.monotonic()
        events = [(0.0, b"a"), (0.01, b"b"), (0.02, b"c"), (0.03, b"d"), (0.25, b"e")]
        return [(time.monotonic() - start, batch) async for batch in coalesce(_timed(events), 0.1)]

    out = asyncio.run(run())
    assert [b for _, b in out] == [b"a", b"bcd", b"e"]
    assert out[0][0] < 0.05  # not held back for the window
    assert out[1][0] < 0.2  # sent when its window closed, not when the next event came


def test_coalesce_flushes_what_it_holds_before_an_error_and_the_end() -> None:
    async def run(fail: Exception | None) -> tuple[list[bytes], Exception | None]:
        got: list[bytes] = []
        try:
            async for batch in coalesce(_timed([(0, b"a"), (0.001, b"b"), (0.002, b"c")], fail), 1.0):
                got.append(batch)
        except EngineFailure as exc:
            return got, exc
        return got, None

    assert asyncio.run(run(None)) == ([b"a", b"bc"], None)
    got, err = asyncio.run(run(EngineFailure("boom")))
    assert got == [b"a", b"bc"] and isinstance(err, EngineFailure)


def test_closing_a_coalesced_stream_closes_its_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run() -> None:
        stream = coalesce(source(), 0.05)
        assert await anext(stream) == b"x"
        await anext(stream)
        await stream.aclose()
        assert closed.is_set()

    asyncio.run(run())


@pytest.mark.parametrize("exc", [
    InvalidRequest("bad temperature", param="temperature"),
    ContextLengthExceeded("too long", param="messages"),
    EngineOverloaded("busy", retry_after_s=7),
    EngineUnavailable("down"),
    EngineFailure("broke", code="engine_error"),
])
def test_engine_errors_cross_the_handle_with_type_param_code_and_retry_after(exc: Exception) -> None:
    wire = to_wire(exc)  # type: ignore[arg-type]
    assert orjson.loads(orjson.dumps(wire)) == wire  # plain data
    back = from_wire(wire)
    assert type(back) is type(exc)
    assert (back.message, back.param, back.code) == (exc.message, exc.param, exc.code)  # type: ignore[attr-defined]
    assert getattr(back, "retry_after_s", None) == getattr(exc, "retry_after_s", None)


def test_handle_failures_map_to_errors_the_gateway_can_act_on() -> None:
    from ray.serve.exceptions import BackPressureError

    assert isinstance(handle_error(BackPressureError(num_queued_requests=3, max_queued_requests=3)), EngineOverloaded)
    assert isinstance(handle_error(RuntimeError("actor died")), EngineUnavailable)  # retryable: fallback may run
    assert isinstance(handle_error(RuntimeError("actor died"), started=True), EngineFailure)


# ---- the gateway's side against a real ModelServer, through an in-process handle ---------------------------
class _Call:
    def __init__(self, coro: Any) -> None:
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self) -> Any:
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class _Stream:
    def __init__(self, gen: AsyncIterator[Any]) -> None:
        self.gen = gen
        self.cancelled = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        return await anext(self.gen)

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.ensure_future(self.gen.aclose())


class _Method:
    def __init__(self, fn: Any, stream: bool, bodies: list[Any] | None = None) -> None:
        self.fn, self.stream, self.bodies = fn, stream, bodies

    def remote(self, *args: Any) -> Any:
        if self.bodies is not None:
            self.bodies.append(args[1])
        return _Stream(self.fn(*args)) if self.stream else _Call(self._call(*args))

    async def _call(self, *args: Any) -> Any:
        out = self.fn(*args)
        return await out if asyncio.iscoroutine(out) else out


class _Handle:
    """What the gateway uses of a DeploymentHandle, calling the replica object in-process."""

    deployment_name = "m@1"

    def __init__(self, replica: ModelServer, streaming: bool = False, session_id: str | None = None) -> None:
        self._replica, self._streaming, self.session_id = replica, streaming, session_id
        self.sessions: list[str | None] = []  # the session id of each request sent through this handle or its options
        self.bodies: list[Any] = []  # the body of each generate, stream or count_prompt_tokens call

    def options(self, stream: bool | None = None, session_id: str | None = None) -> _Handle:
        handle = _Handle(self._replica, self._streaming if stream is None else stream, session_id or self.session_id)
        handle.sessions, handle.bodies = self.sessions, self.bodies
        return handle

    def __getattr__(self, name: str) -> _Method:
        if name in ("generate", "stream"):
            self.sessions.append(self.session_id)
        return _Method(getattr(self._replica, name), self._streaming,
                       self.bodies if name in ("generate", "stream", "count_prompt_tokens") else None)


class _Replica(ModelServer):
    def __del__(self) -> None:  # Serve awaits the async one; the tests shut the engine down themselves
        pass


async def _replica(**fake: Any) -> ModelServer:
    cfg = ModelDeploymentConfig(model="m", engine="fake", placement="deployment", fake=fake)
    replica = _Replica.__new__(_Replica)
    await replica.__init__(cfg.model_dump(mode="json"))  # type: ignore[misc]  # Serve awaits async __init__
    return replica


def _backend(replica: ModelServer) -> ModelBackend:
    cfg = ServeConfig(models=[replica.cfg])
    return build_backend(cfg, None, {"m": _Handle(replica)})


def test_the_gateway_serves_a_deployment_model_like_a_colocated_one() -> None:
    async def run() -> None:
        replica = await _replica(itl_ms=2)
        backend = _backend(replica)
        await backend.start()
        engine = backend.resolve("m")
        assert isinstance(engine, HandleEngine) and engine.card.id == "m" and engine.card.engine == "fake"
        full = orjson.loads(await engine.generate("chat", {"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 5}, "r1"))
        assert full["usage"]["completion_tokens"] == 5
        stream = await engine.generate("completion", {"prompt": "a b c", "max_tokens": 40, "stream": True,
                                                      "stream_options": {"include_usage": True}}, "r2")
        batches = [b async for b in stream]
        events = b"".join(batches).split(b"\n\n")[:-1]
        assert events[-1] == b"data: [DONE]" and orjson.loads(events[-2][6:])["usage"]["completion_tokens"] == 40
        assert 2 <= len(batches) < 42  # coalesced: fewer messages than events, the first alone
        assert len(batches[0].split(b"\n\n")) == 2
        assert await engine.count_prompt_tokens("completion", {"prompt": "a b c"}) == 3  # the replica engine counts
        assert await backend.readiness() == {"m": True}
        assert await backend.readiness(in_process_only=True) == {}  # the gateway's health check leaves it to Serve
        assert engine.busy() == 0 and replica.live.primary.busy() == 0
        await backend.shutdown()
        await replica.live.shutdown()

    asyncio.run(run())


def test_engine_errors_reach_the_gateway_as_themselves_before_and_after_output() -> None:
    async def run() -> None:
        replica = await _replica(max_model_len=32, fail_rate=1.0, fail_after_tokens=3)
        engine = HandleEngine(_Handle(replica), 0, replica.live.primary.card)
        with pytest.raises(ContextLengthExceeded) as info:
            await engine.generate("completion", {"prompt": "w " * 40, "max_tokens": 4}, "r1")
        assert info.value.param is not None
        stream = await engine.generate("completion", {"prompt": "a", "max_tokens": 10, "stream": True}, "r2")
        got = []
        with pytest.raises(EngineFailure):
            async for batch in stream:
                got.append(batch)
        assert b"".join(got).count(b"data: {") == 3  # the tokens before the failure still arrived
        assert engine.busy() == 0
        await replica.live.shutdown()

    asyncio.run(run())


def test_a_client_leaving_aborts_the_request_in_the_replica() -> None:
    async def run() -> None:
        replica = await _replica(itl_ms=5)
        handle = _Handle(replica)
        engine = HandleEngine(handle, 0, replica.live.primary.card)
        stream = await engine.generate("completion", {"prompt": "a", "max_tokens": 1_500, "stream": True}, "r1")
        await anext(stream)
        assert replica.live.primary.busy() == 1
        await stream.aclose()  # what the gateway does when the client disconnects
        task = asyncio.ensure_future(engine.generate("completion", {"prompt": "a", "max_tokens": 1_500}, "r2"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if replica.live.primary.busy() == 0:
                break
            await asyncio.sleep(0.01)
        assert replica.live.primary.busy() == 0 and engine.busy() == 0
        await replica.live.shutdown()

    asyncio.run(run())


def test_the_mirror_follows_the_versions_the_replicas_serve() -> None:
    async def run() -> None:
        replica = await _replica()
        model = HandleModel(replica.cfg, _Handle(replica))
        await model.sync(initial=True)
        first = model.pick()
        # A roll-out in the replica: a second version takes 30% of the traffic.
        from serve.fake_engine import FakeEngine

        replica.live.engines[2] = FakeEngine("m", root="m@2")
        replica.live.weights = {0: 70.0, 2: 30.0}
        assert await model.sync() is True
        assert model.engines[0] is first  # the same engine object keeps its in-flight count
        assert {e.card.root for e in model.engines.values()} == {"m", "m@2"}
        picks = [model.pick().card.root for _ in range(2000)]
        assert 0.25 < picks.count("m@2") / len(picks) < 0.35
        assert await model.sync() is False
        await replica.live.shutdown()

    asyncio.run(run())


# ---- config and Serve options -------------------------------------------------------------------------------
def _app(**model: Any) -> AppConfig:
    return AppConfig.load({"serve": {"models": [
        {"model": "raygate/tiny-chat@stable", "engine": "fake", "placement": "deployment", **model},
        {"model": "side", "engine": "fake", "num_cpus": 0.25},
    ]}})


def test_a_deployment_model_gets_its_own_named_deployment_and_scaling() -> None:
    app = _app(num_cpus=1.5, autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
               max_ongoing_requests=300)
    model = app.serve.models[0]
    opts = model_options(app, model)
    assert opts["name"] == "raygate/tiny-chat@stable" == model_deployment_name(model)
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
    assert opts["max_ongoing_requests"] == 300 and opts["ray_actor_options"]["num_cpus"] == 1.5
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CONFIGURE_LOGGING"] == "0"
    # The gateway replica reserves only the co-located engine's CPUs.
    assert deployment_options(app)["ray_actor_options"]["num_cpus"] == 0.5 + 0.25
    assert model_deployment_name(ModelDeploymentConfig(model="raygate/tiny-chat@3", served_name="chat")) == "chat@3"
    assert model_deployment_name(ModelDeploymentConfig(model="raygate/tiny-chat")) == "raygate/tiny-chat@latest"


def test_placement_options_are_refused_where_they_cannot_apply() -> None:
    with pytest.raises(ValidationError, match="placement `deployment`"):
        ModelDeploymentConfig(model="m", autoscaling={"max_replicas": 2})
    with pytest.raises(ValidationError, match="placement `deployment`"):
        ModelDeploymentConfig(model="m", num_replicas=3)
    with pytest.raises(ValidationError, match="LoRA"):
        ModelDeploymentConfig(model="m", placement="deployment", lora=True)
    with pytest.raises(ValueError, match="no deployment handle"):
        build_backend(ServeConfig(models=[{"model": "m", "engine": "fake", "placement": "deployment"}]), None)


def test_a_deployment_model_routes_by_conversation_unless_told_to_route_by_load() -> None:
    app = _app(num_replicas=3)
    opts = model_options(app, app.serve.models[0])
    router = opts["request_router_config"]
    assert router.request_router_class == "gateway.routing.replica_router:ConversationRequestRouter"
    routing = app.gateway.conversation_routing
    assert router.request_router_kwargs == {"max_load_gap": routing.max_load_gap,
                                            "max_kv_cache_usage": routing.max_kv_cache_usage}
    load = _app(num_replicas=3, routing="load")
    assert "request_router_config" not in model_options(load, load.serve.models[0])  # Serve's default router


def test_a_prefix_tree_model_gets_ray_serve_llms_router_with_the_load_gap_and_eviction() -> None:
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    app = _app(num_replicas=2, routing="prefix_tree")
    router = model_options(app, app.serve.models[0])["request_router_config"]
    assert router.get_request_router_class() is PrefixCacheAffinityRouter
    assert router.request_router_kwargs == {
        "imbalanced_threshold": app.gateway.conversation_routing.max_load_gap, "do_eviction": True,
        "eviction_threshold_chars": PREFIX_TREE_MAX_CHARS, "eviction_target_chars": PREFIX_TREE_KEEP_CHARS}


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
    {"system": "be brief", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},  # Anthropic
    {"input": [{"role": "user", "content": "hi"}]},  # Responses
    {"messages": [{"role": "user", "content": None, "tool_calls": []}]},  # no text at all
])
def test_a_prompt_body_shows_the_router_text_that_only_grows_with_the_conversation(body: dict[str, Any]) -> None:
    history = "messages" if "messages" in body else "input"
    later = {**body, history: [*body[history], {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
    first, after = PromptBody(body).prompt, PromptBody(later).prompt
    assert first and after.startswith(first[:-2]) and len(after) > len(first)  # only `]]` closes the first
    assert PromptBody(body) == body and pickle.loads(pickle.dumps(PromptBody(body))).prompt == first  # the replica's dict


def test_a_prefix_tree_model_sends_every_call_with_a_body_the_router_reads() -> None:
    async def run() -> None:
        replica = await _replica()
        handle = _Handle(replica)
        cfg = ServeConfig(models=[replica.cfg.model_copy(update={"routing": "prefix_tree"})])
        backend = build_backend(cfg, None, {"m": handle})
        await backend.start()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        await backend.resolve("m").generate("chat", body, "r")
        stream = await backend.resolve("m").generate("chat", {**body, "stream": True}, "r")
        _ = [b async for b in stream]
        await backend.resolve("m").count_prompt_tokens("chat", body)
        assert [type(b) for b in handle.bodies] == [PromptBody] * 3 and handle.sessions == [None, None]
        await backend.shutdown()
        await replica.live.shutdown()

    asyncio.run(run())


def test_each_call_carries_its_conversation_key_as_the_session_id() -> None:
    async def run() -> None:
        replica = await _replica()
        handle = _Handle(replica)
        cfg = ServeConfig(models=[replica.cfg])
        backend = build_backend(cfg, None, {"m": handle})
        await backend.start()
        engine = backend.resolve("m")
        first = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
        later = [*first, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}]
        for messages in (first, later):
            await engine.generate("chat", {"model": "m", "messages": messages, "max_tokens": 2}, "r")
        stream = await engine.generate("chat", {"model": "m", "messages": later, "max_tokens": 2, "stream": True}, "r")
        _ = [b async for b in stream]
        await engine.generate("chat", {"model": "m", "messages": first, "prompt_cache_key": "k1"}, "r")
        key = conversation_key({"model": "m", "messages": first})
        assert handle.sessions == [key, key, key, "k:k1"]  # one conversation, one key; the client's key wins
        load = build_backend(ServeConfig(models=[replica.cfg.model_copy(update={"routing": "load"})]), None,
                             {"m": (plain := _Handle(replica))})
        await load.start()
        await load.resolve("m").generate("chat", {"model": "m", "messages": first, "max_tokens": 2}, "r")
        assert plain.sessions[-1] is None
        await backend.shutdown()
        await load.shutdown()
        await replica.live.shutdown()

    asyncio.run(run())


def test_custom_resources_put_a_model_on_the_nodes_that_offer_them() -> None:
    app = _app(resources={"rg_worker": 0.5})
    assert model_options(app, app.serve.models[0])["ray_actor_options"]["resources"] == {"rg_worker": 0.5}
    colocated = AppConfig.load({"serve": {"models": [
        {"model": "a", "engine": "fake", "resources": {"big_mem": 1}},
        {"model": "b", "engine": "fake", "resources": {"big_mem": 1, "ssd": 0.5}},
    ]}})  # the gateway replica hosts both engines: it needs what both need
    assert deployment_options(colocated)["ray_actor_options"]["resources"] == {"big_mem": 2, "ssd": 0.5}
    assert "resources" not in model_options(_app(), _app().serve.models[0])["ray_actor_options"]


def test_a_deployment_with_no_replica_answering_is_refused_at_once_until_one_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's handle queues a call while the deployment has no running replica (its node died), however long.
    The mirror's poll notices (no answer within TABLE_TIMEOUT_S) and new requests get 503 at once, until a
    replica answers the poll again."""
    monkeypatch.setattr("serve.handle_engine.TABLE_TIMEOUT_S", 0.1)

    async def run() -> None:
        replica = await _replica()
        model = HandleModel(replica.cfg, _Handle(replica))
        await model.sync(initial=True)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        await model.pick().generate("chat", body, "r1")
        answering = replica.table
        gone = asyncio.Event()

        async def no_replica() -> dict[str, Any]:
            await gone.wait()  # what a queued handle call does while no replica runs
            return answering()

        replica.table = no_replica  # type: ignore[method-assign]
        with pytest.raises(EngineUnavailable):
            await model.sync()
        assert model.unreachable is not None
        started = time.monotonic()
        with pytest.raises(EngineUnavailable) as refused:
            await model.pick().generate("chat", body, "r2")
        assert time.monotonic() - started < 0.05 and refused.value.retry_after_s
        replica.table = answering  # type: ignore[method-assign]  # the node is back: a replica answers
        await model.sync()
        assert model.unreachable is None
        await model.pick().generate("chat", body, "r3")
        await replica.live.shutdown()

    asyncio.run(run())
