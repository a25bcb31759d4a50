"""A key database that cannot be reached answers 503 in the OpenAI envelope, never a 500; at start it is one line."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.gate import Governance
from gateway.governance.quota import LocalQuota
from gateway.governance.store import KeyStore
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine

ADMIN = "rg-admin-unit-0123456789abcdef"


async def test_unreachable_key_store_is_503(tmp_path: Path) -> None:
    settings = GatewaySettings(home=tmp_path, admin_key=ADMIN)
    secret = b"s" * 32
    store = KeyStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1", secret)
    gov = Governance(settings, secret=secret, store=store, limiter=LocalQuota(), ledger=None)
    app = create_app(settings, ModelBackend({"f": FakeEngine("f", FakeEngineConfig())}), gov)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        for r in (
            await c.get("/v1/models", headers={"authorization": "Bearer rg-some-user-key"}),
            await c.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}),
        ):
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "key_store_unavailable"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_an_unreachable_database_at_start_is_one_line_without_the_password(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support import free_port

    config = tmp_path / "gw.yaml"
    config.write_text(
        "gateway:\n  settings:\n"
        f"    database_url: postgresql+psycopg://ana:s3cret-pass@127.0.0.1:{free_port()}/keys\n"
        f"    key_secret: {'k' * 32}\n"
        "serve:\n  models:\n    - model: m\n      engine: fake\n"
    )
    exe = Path(sys.executable).with_name("raygate")
    proc = subprocess.run([str(exe), "--home", str(tmp_path), "gateway", "--config", str(config), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("raygate: cannot open the key store at postgresql+psycopg://ana:***@127.0.0.1:")
    assert len(proc.stderr.strip().splitlines()) == 1 and "s3cret-pass" not in proc.stdout + proc.stderr
