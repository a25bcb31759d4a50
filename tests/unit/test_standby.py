"""While no gateway replica listens on the port, `raygate up` answers 503 with Retry-After (raygate/standby.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import httpx
import openai
import pytest

from gateway.listener import reuse_port_socket
from raygate.standby import Standby, _listening_by_diag, _listening_by_proc, drain_backlog, listening_sockets
from tests.support import free_port, wait_until


def _replica(port: int) -> tuple[socket.socket, threading.Thread]:
    """A listener sharing the port as a gateway replica does, answering 200 to each connection."""
    sock = reuse_port_socket("127.0.0.1", port)
    sock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def test_the_port_answers_503_while_no_replica_listens_and_steps_aside_when_one_does() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    standby = Standby("127.0.0.1", port, every_s=0.05).start()
    try:
        assert wait_until(lambda: standby.answering, 5, every_s=0.02)
        resp = httpx.post(url, json={"model": "m", "messages": [{"role": "user", "content": "x" * 100_000}]})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "2"
        assert resp.json()["error"] == {"message": resp.json()["error"]["message"], "type": "server_error",
                                        "param": None, "code": "no_replica"}
        client = openai.OpenAI(api_key="k", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503 and err.value.code == "no_replica"

        sock, thread = _replica(port)  # Serve's replacement replica listens: the standby steps aside
        assert wait_until(lambda: not standby.answering, 5, every_s=0.02)
        assert listening_sockets(port) == {os.fstat(sock.fileno()).st_ino}
        assert all(httpx.get(url).status_code == 200 for _ in range(20))  # no share of the traffic taken

        sock.shutdown(socket.SHUT_RDWR)  # the replica dies (shutdown wakes its blocked accept; close alone would not)
        sock.close()
        thread.join(5)
        assert not thread.is_alive()
        assert wait_until(lambda: standby.answering, 5, every_s=0.02)
        assert httpx.get(url).status_code == 503
    finally:
        standby.stop()
    assert not standby.answering and not listening_sockets(port)  # a stop leaves the port to be refused
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def _queued_requests(port: int, n: int) -> list[socket.socket]:
    """`n` clients whose connections the kernel completed and queued on the port, each with its request sent."""
    clients = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        clients.append(c)
    return clients


def _answer_of(client: socket.socket) -> bytes:
    with client:
        data = b""
        while chunk := client.recv(65536):
            data += chunk
        return data


def test_connections_queued_when_a_replica_comes_back_are_answered_not_reset() -> None:
    """Closing a listening socket resets the connections still in its queue (the premise, checked first); the
    standby accepts what is queued before it closes and answers each with the 503."""
    port = free_port()
    sock = reuse_port_socket("127.0.0.1", port)
    sock.listen(16)
    (lost,) = _queued_requests(port, 1)
    sock.close()
    with pytest.raises(ConnectionResetError):
        _answer_of(lost)

    sock = reuse_port_socket("127.0.0.1", port)
    sock.listen(16)
    clients = _queued_requests(port, 3)
    queued = drain_backlog(sock)
    sock.close()
    assert len(queued) == 3
    empty = reuse_port_socket("127.0.0.1", free_port())
    empty.listen()
    with empty:
        assert drain_backlog(empty) == []  # nothing queued: returns at once

    async def answer_all() -> None:
        await asyncio.gather(*(Standby._answer_socket(conn) for conn in queued))

    asyncio.run(answer_all())
    for client in clients:
        assert _answer_of(client).startswith(b"HTTP/1.1 503 ")


def test_the_kernels_socket_diagnostics_find_exactly_the_listeners_that_proc_lists() -> None:
    """The standby asks the kernel for listening sockets only (cheap under load); /proc/net is the fallback.
    Both must name the same sockets: IPv4 and IPv6 listeners on the port, and neither the connections to it nor
    a listener on another port."""
    port = free_port()
    v4 = reuse_port_socket("127.0.0.1", port)
    v4.listen()
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", port))
    v6.listen()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = v4.accept()
    try:
        wanted = {os.fstat(s.fileno()).st_ino for s in (v4, v6)}
        assert _listening_by_diag(port) == wanted
        assert _listening_by_proc(port) == wanted
        assert listening_sockets(port) == wanted
    finally:
        for s in (accepted, client, other, v6, v4):
            s.close()
    assert _listening_by_diag(port) == set() == _listening_by_proc(port)
