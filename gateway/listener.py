"""A gateway replica's own HTTP listener: on one node the replicas take client connections themselves.

`raygate up` on one machine puts nothing between a client and a gateway replica: every replica binds
the public address with SO_REUSEPORT and the kernel spreads new connections over those listening. A
proxy in front (Serve's HAProxy) is a second process relaying every streamed token; on one node it
only spreads connections, which the kernel does as well. A rolling update's new replica listens before
the old one stops; a stopping replica closes its listener at once (new connections go to the others, or
are refused when it was the last), then lets the requests it holds finish.

Behind Serve's ingress (clusters, `serve deploy`, conversation routing, gateway autoscaling) this module
is not used: Serve's proxies reach the replicas instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from gateway.errors import ReplicaBusy, error_response

logger = logging.getLogger(__name__)

# Idle keep-alive connections are kept this long, as Serve's proxies keep them: clients reuse pooled
# connections, and a server closing one just as a client sends on it fails that request.
KEEP_ALIVE_S = 90


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other replicas of this user may bind as well."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def bounded(app: Any, limit: int) -> Any:
    """`app`, answering 503 with `Retry-After` (OpenAI's envelope) while `limit` HTTP requests are in flight."""
    in_flight = 0

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal in_flight
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if in_flight >= limit:
            busy = ReplicaBusy(f"This gateway replica holds {limit} requests; retry shortly.")
            return await error_response(busy)(scope, receive, send)
        in_flight += 1
        try:
            return await app(scope, receive, send)
        finally:
            in_flight -= 1

    return wrapped


def with_response_header(app: Any, name: bytes, value_for: Callable[[dict[str, Any]], bytes | None]) -> Any:
    """`app`, adding `name: value_for(scope)` to every HTTP response that lacks it (no header where it is None)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        value = value_for(scope) if scope["type"] == "http" else None
        if value is None:
            return await app(scope, receive, send)

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == name for k, _ in headers):
                    message["headers"] = [*headers, (name, value)]
            await send(message)

        return await app(scope, receive, send_with_header)

    return wrapped


def caller_request_id(scope: dict[str, Any]) -> bytes | None:
    """The `x-request-id` a caller sent, which Serve's ingress echoes and so does a listening replica (the
    gateway sets its own id only when the caller sent none)."""
    return next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)


class _Server(uvicorn.Server):
    """uvicorn, leaving the process's signals alone: the replica's process is Ray's, and so are its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Listener:
    """Serves an ASGI app on a bound socket (`reuse_port_socket`) from the running event loop; drains on `close`.

    Binding is apart from serving so that a replica finds a taken port in a second, before its engines load;
    the kernel sends connections only to sockets that listen, which this one does from `start`.
    """

    def __init__(self, app: Any, sock: socket.socket, max_requests: int) -> None:
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.address = f"{host}:{port}"
        config = uvicorn.Config(
            with_response_header(bounded(app, max_requests), b"x-request-id", caller_request_id),
            lifespan="off", access_log=False, log_config=None, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
        )
        self.server = _Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        """Serve; returns once connections are accepted."""
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.server.started:
            if self.task.done():
                self.task.result()  # its error, if it failed
                raise RuntimeError(f"the listener on {self.address} stopped before it started")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the listener on {self.address} did not start in {timeout_s:.0f}s")
            await asyncio.sleep(0.01)
        logger.info("listening on %s", self.address)

    async def close(self, timeout_s: float) -> None:
        """Stop accepting, close idle connections, let requests in flight finish for up to `timeout_s`."""
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=timeout_s)
        except TimeoutError:
            logger.warning("requests still in flight after %.0fs of draining; closing them", timeout_s)
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        self.task = None
