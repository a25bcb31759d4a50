"""The console's session cookies, CSRF tokens and charts (pure)."""

from __future__ import annotations

from gateway.console.charts import bar_chart
from gateway.console.session import ConsoleSessions


def test_a_session_is_signed_expires_and_binds_its_csrf_token() -> None:
    now = [1000.0]
    sessions = ConsoleSessions(b"k" * 32, ttl_s=60, clock=lambda: now[0])
    cookie = sessions.issue()
    nonce = sessions.nonce(cookie)
    assert nonce is not None and sessions.csrf_ok(nonce, sessions.csrf(nonce))
    assert not sessions.csrf_ok(nonce, "") and not sessions.csrf_ok(nonce, sessions.csrf("another"))
    expiry, n, sig = cookie.split(".")
    assert sessions.nonce(f"{int(expiry) + 3600}.{n}.{sig}") is None  # a longer life is a forgery
    assert sessions.nonce(f"{expiry}.{n}.{'0' * len(sig)}") is None
    assert sessions.nonce("garbage") is None and sessions.nonce(None) is None
    assert ConsoleSessions(b"j" * 32, ttl_s=60, clock=lambda: now[0]).nonce(cookie) is None  # another admin key
    now[0] += 61
    assert sessions.nonce(cookie) is None


def test_charts_escape_their_labels() -> None:
    svg = bar_chart("<t>", [("<script>alert(1)</script>", 2.0), ("b", 1.0)], "EUR")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and svg.count("<rect") == 2
    assert "no usage" in bar_chart("empty", [])


async def test_console_bodies_are_bounded_and_bad_dates_refused(tmp_path) -> None:
    import httpx

    from gateway import create_app
    from gateway.backend import ModelBackend
    from gateway.settings import GatewaySettings
    from serve.config import FakeEngineConfig
    from serve.fake_engine import FakeEngine

    app = create_app(GatewaySettings(admin_key="admin-key-0123456789abcdef", home=tmp_path),
                     ModelBackend({"fake": FakeEngine("fake", FakeEngineConfig())}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        r = await http.post("/ui/login", content=b"admin_key=" + b"x" * (2 << 20),
                            headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await http.post("/ui/login", data={"admin_key": "admin-key-0123456789abcdef"})
        assert r.status_code == 303 and r.headers["location"] == "/ui"
        for path in ("/ui/usage", "/ui/usage.csv"):  # a bad date is the console's 400 page, never a 500
            r = await http.get(path, params={"since": "yesterday"})
            assert r.status_code == 400 and "YYYY-MM-DD" in r.text
