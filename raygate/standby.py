"""Answers on the gateway's port while no replica listens there: a 503 with Retry-After, not a refused connection.

On one node the gateway replicas take connections themselves (gateway/listener.py). When the last one dies
(killed, out of memory) nothing listens until Serve has started another and its engines have loaded: tens of
seconds of refused connections, which clients report as a network failure. `raygate up` watches the port
instead; while no replica listens, it listens itself (SO_REUSEPORT, as the replicas do) and answers every
request with OpenAI's error envelope, 503 `no_replica` and `Retry-After`, which the official SDKs retry.
As soon as a replica listens again it stops, so it never takes a share of the traffic a replica can serve;
connections the kernel queued on its socket by then are answered before it closes (closing a listening socket
resets the connections still waiting in its queue: a client would see its request cut, not refused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import struct
import threading

import orjson

from gateway.errors import NoReplicaServing, error_body
from gateway.listener import reuse_port_socket

logger = logging.getLogger(__name__)

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024  # read (and drop) a body up to this before answering, so the client sees the answer
READ_TIMEOUT_S = 5.0
ACCEPT_RETRY_S = 0.1  # after a failed accept (no descriptor left), before the next

# The kernel's socket diagnostics (linux/sock_diag.h, linux/inet_diag.h): asked for listening TCP sockets only,
# it answers with those few, where /proc/net/tcp lists every connection of the host (thousands under load).
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 4, 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_HEADER = struct.Struct("=LHHLL")  # nlmsghdr
_SPORT, _INODE = 4, 4 + 48 + 16  # offsets in inet_diag_msg: after family/state/timer/retrans; after the id
_NO_COOKIE = 0xFFFFFFFFFFFFFFFF


def _diag_request(family: int) -> bytes:
    """A dump request for the listening TCP sockets of one address family (inet_diag_req_v2)."""
    request = (struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
               + bytes(4 + 32) + struct.pack("=IQ", 0, _NO_COOKIE))
    return _HEADER.pack(_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0) + request


def _listening_by_diag(port: int) -> set[int]:
    inodes: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
        for family in (socket.AF_INET, socket.AF_INET6):
            diag.sendto(_diag_request(family), (0, 0))
            done = False
            while not done:
                data, offset = diag.recv(65536), 0
                while offset < len(data):
                    length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        raise OSError(-struct.unpack_from("=i", data, offset + _HEADER.size)[0], "sock_diag refused")
                    body = offset + _HEADER.size
                    if struct.unpack_from(">H", data, body + _SPORT)[0] == port:
                        inodes.add(struct.unpack_from("=I", data, body + _INODE)[0])
                    offset += (length + 3) & ~3
    return inodes


def _listening_by_proc(port: int) -> set[int]:
    wanted = f"{port:04X}"
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN and fields[1].rsplit(":", 1)[1] == wanted:
                    inodes.add(int(fields[9]))
    return inodes


def listening_sockets(port: int) -> set[int]:
    """Inodes of the sockets in this network namespace that listen on TCP `port` (any address).

    Asks the kernel's socket diagnostics for listening sockets only; where a sandbox refuses netlink, reads
    /proc/net/tcp and tcp6 instead (every connection of the host: costly under load)."""
    try:
        return _listening_by_diag(port)
    except OSError:
        return _listening_by_proc(port)


def unavailable_response() -> bytes:
    """The whole HTTP/1.1 answer: 503, OpenAI's envelope, Retry-After, and the connection closed."""
    status, envelope, headers = error_body(NoReplicaServing(
        "No gateway replica is serving right now (one is being restarted); retry shortly."))
    body = orjson.dumps(envelope)
    head = [f"HTTP/1.1 {status} Service Unavailable", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        if 0 < length <= MAX_BODY:
            await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S)
        writer.write(unavailable_response())
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        pass  # the client went away or sent no request: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def drain_backlog(sock: socket.socket) -> list[socket.socket]:
    """Accept every connection waiting in a listening socket's queue, without waiting for more."""
    sock.setblocking(False)
    out: list[socket.socket] = []
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return out
        out.append(conn)


class Standby:
    """Watches (host, port) from a thread of its own; listens there while no other socket does."""

    def __init__(self, host: str, port: int, every_s: float = 0.2) -> None:
        self.host, self.port, self.every_s = host, port, every_s
        self.answering = False  # listening now, for tests and the log
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="raygate-standby", daemon=True)
        self._watch: concurrent.futures.Future[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()

    def start(self) -> Standby:
        self._thread.start()
        self._watch = asyncio.run_coroutine_threadsafe(self._watch_forever(), self._loop)
        return self

    def stop(self) -> None:
        """Stop watching and answering (before the replicas drain, so that a stop refuses new connections)."""
        if self._watch is None:
            return
        self._watch.cancel()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._watch = None

    async def _watch_forever(self) -> None:
        sock: socket.socket | None = None
        own: int | None = None
        accepting: asyncio.Task[None] | None = None
        try:
            while True:
                others = listening_sockets(self.port) - {own}
                if sock is None and not others:
                    try:
                        sock = reuse_port_socket(self.host, self.port)
                    except OSError:  # held by a socket without SO_REUSEPORT, not listening yet: look again
                        await asyncio.sleep(self.every_s)
                        continue
                    sock.listen(128)
                    sock.setblocking(False)
                    own = os.fstat(sock.fileno()).st_ino
                    accepting = asyncio.create_task(self._accept_forever(sock))
                    self.answering = True
                    logger.warning("no gateway replica listens on %s:%d: answering 503 until one does",
                                   self.host, self.port)
                elif sock is not None and others:
                    assert accepting is not None
                    accepting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await accepting
                    for conn in drain_backlog(sock):  # queued before the replica listened: answered, not reset
                        self._answer_later(conn)
                    sock.close()
                    sock, own, accepting, self.answering = None, None, None, False
                    logger.warning("a gateway replica listens on %s:%d again", self.host, self.port)
                await asyncio.sleep(self.every_s)
        finally:
            if accepting is not None:
                accepting.cancel()
            if sock is not None:
                sock.close()
            self.answering = False

    async def _accept_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # no descriptor left (a flood of idle connections): try again, as asyncio's servers do
                logger.warning("standby on port %d could not accept: %s", self.port, exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            self._answer_later(conn)

    def _answer_later(self, conn: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._answer_socket(conn))
        self._answering.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._answering.discard)

    @staticmethod
    async def _answer_socket(conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_HEAD)
        except OSError:
            conn.close()
            return
        await _answer(reader, writer)
