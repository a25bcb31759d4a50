"""`raygate gateway` on SIGTERM: streams and full responses in flight finish whole, new requests are refused
(a closed port or a 503 envelope, never a 200 that is then cut), and the ledger has a row for every request
that was answered. One real process, the fake engine, SQLite."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from gateway.governance.store import KeyStore
from tests.support import free_port, wait_until

KEY = "sk-drain-gateway-0123456789"
MSG = [{"role": "user", "content": "hi"}]


def test_sigterm_drains_streams_and_full_responses(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"gateway:\n  settings:\n    api_keys: [{KEY}]\n    admin_key: {'a' * 24}\n    key_secret: {'s' * 32}\n"
        "serve:\n  models:\n    - model: m\n      engine: fake\n      fake:\n        itl_ms: 20\n        ttft_ms: 20\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("raygate")
    log = tmp_path / "gw.log"
    proc = subprocess.Popen([str(exe), "--home", str(tmp_path), "gateway", "--config", str(config), "--port",
                             str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    headers = {"authorization": f"Bearer {KEY}"}
    results: list[tuple[str, int, str]] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        body = {"model": "m", "messages": MSG, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                if not lines:
                    started.release()
                lines.append(line)
            tokens = sum('"content":"tok' in line for line in lines)
            results.append(("stream", r.status_code, f"{tokens} {'data: [DONE]' in lines}"))

    def full() -> None:
        started.release()
        r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": "m", "messages": MSG, "max_tokens": 100})
        results.append(("full", r.status_code, str(r.json()["usage"]["completion_tokens"])))

    try:
        assert wait_until(lambda: _up(base), 60, every_s=0.2), log.read_text()
        threads = [threading.Thread(target=f) for f in (stream, stream, stream, full, full)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=30)
        time.sleep(0.3)  # the full responses are in the engine now
        proc.send_signal(signal.SIGTERM)
        late: list[int] = []

        def refused() -> bool:
            try:
                r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=30,
                               json={"model": "m", "messages": MSG, "max_tokens": 3})
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                return True
            late.append(r.status_code)
            assert r.status_code == 503 or len(r.json()["choices"][0]["message"]["content"]) > 0
            return False

        assert wait_until(refused, 15, every_s=0.1), late
        assert any(t.is_alive() for t in threads), "everything ended before the port closed: nothing was drained"
        for t in threads:
            t.join(60)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-2000:]
    assert sorted(results) == sorted([("stream", 200, "100 True")] * 3 + [("full", 200, "100")] * 2), results
    answered = len(results) + sum(1 for s in late if s == 200)
    store = KeyStore(f"sqlite:///{tmp_path / 'raygate.db'}", b"s" * 32)
    try:
        rows = store.usage_summary()
        assert sum(r["requests"] for r in rows) == answered  # the last rows were written on the way out
    finally:
        store.close()


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
