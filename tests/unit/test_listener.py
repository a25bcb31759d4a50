"""The replica's own listener (gateway/listener.py) on real sockets, and when `raygate up` uses it."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from gateway.config import AppConfig
from gateway.listener import Listener, reuse_port_socket
from raygate.stack import RAY_AGENT_PORT, Stack, StartFailed, check_port_free, port_clash
from tests.support import free_port, free_ports


def slow_app(release: asyncio.Event, entered: asyncio.Event | None = None):
    """An ASGI app whose `/slow` sets `entered`, then answers once `release` is set; every other path at once."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["path"] == "/slow":
            if entered is not None:
                entered.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"done"})

    return app


def test_replicas_share_the_port_and_anything_else_is_told_who_holds_it() -> None:
    port = free_port()
    a = reuse_port_socket("127.0.0.1", port)
    b = reuse_port_socket("127.0.0.1", port)  # a second replica of the same stack (a rolling update's new one)
    try:
        a.listen()
        with pytest.raises(StartFailed, match=rf"127.0.0.1:{port}: Address already in use; held by pid \d+"):
            check_port_free("127.0.0.1", port)  # what `raygate up` says when a stack is already there
    finally:
        a.close()
        b.close()
    check_port_free("127.0.0.1", port)
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", port))
        plain.listen()
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            reuse_port_socket("127.0.0.1", port)


async def test_close_lets_requests_in_flight_finish_and_refuses_new_connections() -> None:
    port = free_port()
    release, entered = asyncio.Event(), asyncio.Event()
    listener = Listener(slow_app(release, entered), reuse_port_socket("127.0.0.1", port), max_requests=100)
    await listener.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        in_flight = asyncio.create_task(client.get("/slow"))
        await asyncio.wait_for(entered.wait(), 10)
        closing = asyncio.create_task(listener.close(timeout_s=30))
        while _accepts(port):
            await asyncio.sleep(0.01)
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as fresh:
                await fresh.get(f"http://127.0.0.1:{port}/fast")
        await asyncio.sleep(0)
        assert not closing.done()  # still draining the request it holds
        release.set()
        response = await in_flight
        await closing
    assert response.status_code == 200 and response.text == "done"


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_close_gives_up_on_requests_past_the_drain_time() -> None:
    port = free_port()
    entered = asyncio.Event()
    listener = Listener(slow_app(asyncio.Event(), entered), reuse_port_socket("127.0.0.1", port), max_requests=100)
    await listener.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        stuck = asyncio.create_task(client.get("/slow"))
        await asyncio.wait_for(entered.wait(), 10)
        await asyncio.wait_for(listener.close(timeout_s=0.2), timeout=10)
        with pytest.raises(httpx.HTTPError):
            await stuck


async def test_a_full_replica_answers_503_in_openai_envelope() -> None:
    port = free_port()
    release, entered = asyncio.Event(), asyncio.Event()
    listener = Listener(slow_app(release, entered), reuse_port_socket("127.0.0.1", port), max_requests=1)
    await listener.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            held = asyncio.create_task(client.get("/slow"))
            await asyncio.wait_for(entered.wait(), 10)
            busy = await client.get("/fast", headers={"x-request-id": "caller-7"})
            release.set()
            assert (await held).status_code == 200
            assert (await client.get("/fast")).status_code == 200  # the slot is free again
    finally:
        await listener.close(timeout_s=5)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "replica_busy"
    assert busy.headers["x-request-id"] == "caller-7"  # echoed, as Serve's ingress does


@pytest.mark.parametrize(("gateway", "reason"), [
    ({}, None),
    ({"num_replicas": 2, "settings": {"redis_url": "redis://x"}}, None),  # the kernel spreads connections
    ({"conversation_routing": {"enabled": True}}, "conversation routing"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2}}, "gateway autoscaling"),
])
def test_raygate_up_lets_replicas_listen_unless_the_config_needs_serves_ingress(gateway, reason) -> None:
    cfg = AppConfig.load({"gateway": gateway, "serve": {"models": [{"model": "m", "engine": "fake"}]}})
    assert cfg.gateway.needs_serve_ingress() == reason
    assert Stack(cfg).replicas_listen is (reason is None)


def test_serves_ingress_is_kept_where_the_config_needs_it() -> None:
    from gateway.builder import build_application

    cfg = AppConfig.load({"gateway": {"conversation_routing": {"enabled": True}},
                          "serve": {"models": [{"model": "m", "engine": "fake"}]}})
    with pytest.raises(ValueError, match="conversation routing needs Serve's ingress"):
        build_application(cfg, listen=("127.0.0.1", 8000))


def test_ports_that_ray_would_refuse_are_named_before_ray_starts(tmp_path) -> None:  # noqa: ANN001
    assert port_clash({"--port": 8000, "--dashboard-port": 8265, "--metrics-port": 8080}) is None
    assert port_clash({"--port": 8000, "--dashboard-port": 8000}) == (
        "--port and --dashboard-port are both 8000; pass another --dashboard-port.")
    port, metrics = free_ports(2)
    stack = Stack(AppConfig.load({"serve": {"models": [{"model": "m", "engine": "fake"}]}}), port=port,
                  dashboard_port=RAY_AGENT_PORT, metrics_export_port=metrics, state_dir=tmp_path)
    with pytest.raises(StartFailed, match=rf"--dashboard-port {RAY_AGENT_PORT} is the port Ray's dashboard agent"):
        stack.start(ready_timeout_s=1)
    assert not stack.started  # Ray was never started


def test_up_names_who_holds_its_dashboard_or_metrics_port_before_starting_ray(tmp_path) -> None:  # noqa: ANN001
    from gateway.config import AppConfig

    port, dashboard, metrics = free_ports(3)
    stack = Stack(AppConfig.load({"serve": {"models": [{"model": "m", "engine": "fake"}]}}), port=port,
                  dashboard_port=dashboard, metrics_export_port=metrics, state_dir=tmp_path)
    for held, flag in ((dashboard, "--dashboard-port"), (metrics, "--metrics-port")):
        with socket.socket() as foreign:  # a process that is not a raygate stack's: named, never touched
            foreign.bind(("127.0.0.1", held))
            foreign.listen()
            with pytest.raises(StartFailed, match=rf"127.0.0.1:{held}: .*held by pid \d+.*another {flag}"):
                stack.start(ready_timeout_s=1)
    assert not stack.started  # Ray was never started
