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
