"""What tests share: free ports, a private redis-server, a bounded wait on a condition, a client that leaves.

The machine's Redis and PostgreSQL are shared with other work: tests never flush a database they
did not create. Redis comes from a server of the test's own, on a free port, gone when the test ends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raygate.stack import RAY_AGENT_PORT

# vLLM's arguments for the test stacks' engines: no torch.compile at start (docs/operations.md, "CPU hosts"). A
# stack starts three engines and tests restart them; compiled, each start pays for it again. The LoRA gateway of
# test_rollout_lifecycle keeps vLLM's compiled default, so it runs somewhere in the suite.
EAGER: dict[str, bool] = {"enforce_eager": True}


def free_port() -> int:
    """A TCP port nothing listens on now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together while they are picked), never the port Ray's dashboard
    agent takes on every node: the kernel's ephemeral range holds it, and a stack given it does not start."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n + 1:  # one more than asked: at most one of them is Ray's
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [p for p in (int(s.getsockname()[1]) for s in socks) if p != RAY_AGENT_PORT][:n]
    finally:
        for s in socks:
            s.close()


# Logprob gap of a greedy choice's two best tokens that rounding can swap: two engines splitting the same model
# over one and over two workers sum their partial products in another order.
GREEDY_TIE = 0.1


def greedy_tokens_agreeing(one: Any, two: Any, tie: float = GREEDY_TIE) -> int:
    """How many greedy tokens two completions' logprobs (`logprobs=2`) agree on: every token up to the first
    position where they differ, which must be a near-tie of `one`'s two best tokens (the default model is
    untrained, so its logits hold such ties); each agreeing token's logprob within `tie` of the other's."""
    assert one is not None and two is not None and one.tokens and one.top_logprobs
    for i, (a, b) in enumerate(zip(one.tokens, two.tokens, strict=True)):
        if a != b:
            best = sorted(one.top_logprobs[i].values(), reverse=True)
            assert len(best) == 2 and best[0] - best[1] < tie, (i, one.top_logprobs[i], a, b)
            return i
        assert abs(one.token_logprobs[i] - two.token_logprobs[i]) < tie, (i, a)
    return len(one.tokens)


def wait_until(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(every_s)
    return predicate()


class PrivateRedis:
    """A redis-server of the test's own on a free port, nothing on disk; it can be stopped and started again."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.host = host  # where it listens: 0.0.0.0 for clients in other network namespaces
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def start(self) -> PrivateRedis:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is on every machine"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", self.host, "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait_until(self._accepts, 10, every_s=0.05):
            raise TimeoutError("private redis-server did not start")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


async def asgi_call(
    app: Any, path: str, body: dict[str, Any], headers: dict[str, str], *, leave_after_s: float | None = None,
    sends_before_reset: int | None = None,
) -> list[dict[str, Any]]:
    """One POST straight through ASGI, from a client that goes away: it reports leaving after `leave_after_s`,
    or its connection resets after `sends_before_reset` messages went out (0: as the response starts).
    Returns the messages sent before that."""
    import orjson

    raw = orjson.dumps(body)
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(leave_after_s if leave_after_s is not None else 3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if sends_before_reset is not None and len(sent) >= sends_before_reset:
            raise OSError("connection reset by peer")
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "server": ("gw", 80), "client": ("127.0.0.1", 1),
             "headers": [(k.encode(), v.encode()) for k, v in {**headers, "content-type": "application/json"}.items()]}
    try:
        await app(scope, receive, send)
    except Exception:  # noqa: BLE001 - the server's part once the client is gone
        assert sends_before_reset is not None
    return sent


def settled_outcomes(app: Any) -> list[Any]:
    """The outcomes `app`'s governance settles quotas and writes ledger rows with, appended as they happen."""
    gov, seen = app.state.governance, []
    finish = gov.finish

    async def spy(record: Any, adm: Any, outcome: Any, request_id: str, latency_s: float) -> None:
        seen.append(outcome)
        await finish(record, adm, outcome, request_id, latency_s)

    gov.finish = spy
    return seen


class WebhookReceiver:
    """An HTTP server in a thread that keeps the JSON body of every POST it gets (a webhook's far end)."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []  # type: list[dict[str, Any]]
        raw = self.raw = []  # type: list[tuple[dict[str, str], bytes]]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                raw.append((dict(self.headers), body))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def chromium_browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (`make test` installs both; no browser download)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


ARTIFACTS = Path(os.environ.get("RAYGATE_TEST_ARTIFACTS", Path(__file__).parents[1] / "build" / "test-artifacts"))


def screenshot(page: Any, folder: str, name: str) -> None:
    """A full-page screenshot into the test artifacts (`build/test-artifacts/`, or RAYGATE_TEST_ARTIFACTS)."""
    (ARTIFACTS / folder).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / folder / f"{name}.png"), full_page=True)


def console_key_cost(page: Any, base_url: str, name: str, timeout_s: float = 15) -> tuple[str, str]:
    """Open the console page of the key named `name` and wait for its one usage row (the ledger writes within its
    flush interval): the page's URL and the row's cost as shown."""
    page.goto(base_url + "/ui/keys")
    page.click(f"#keys tr:has-text('{name}') a")
    url = page.url

    def shown() -> bool:
        page.goto(url)
        return page.locator("#key-usage td.cost").count() == 1

    assert wait_until(shown, timeout_s, every_s=0.3), page.inner_text("main")
    return url, page.inner_text("#key-usage td.cost")


PG_ADMIN = os.environ.get("RAYGATE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextmanager
def own_database() -> Iterator[str]:
    """The URL of a new database on the machine's PostgreSQL, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"raygate_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
