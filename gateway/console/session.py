"""Console sessions: a signed cookie for whoever gave the admin key, and a CSRF token bound to it (pure).

Stateless: the cookie holds an expiry and a nonce, signed with a key derived from the server secret and
the admin key (`Governance.session_key`), so a new admin key ends every session. Each form carries the
session's CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

COOKIE = "rg_console"


class ConsoleSessions:
    def __init__(self, key: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._key, self.ttl_s, self.clock = key, ttl_s, clock

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session's cookie value."""
        payload = f"{int(self.clock() + self.ttl_s)}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._sign(payload)}"

    def nonce(self, cookie: str | None) -> str | None:
        """The session's nonce if `cookie` is one this gateway signed and it has not expired, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        expiry, nonce, sig = cookie.split(".")
        if not hmac.compare_digest(sig, self._sign(f"{expiry}.{nonce}")):
            return None
        return nonce if expiry.isdigit() and int(expiry) > self.clock() else None

    def csrf(self, nonce: str) -> str:
        """The CSRF token every form of the session carries."""
        return self._sign("csrf:" + nonce)

    def csrf_ok(self, nonce: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(nonce), token or "")
