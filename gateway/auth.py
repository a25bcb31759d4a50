"""API-key authentication: constant-time, keys never in URLs, never logged."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

from gateway.errors import AuthenticationFailed

_URL_KEY_PARAMS = ("api_key", "api-key", "key", "access_token")
_INVALID = "Incorrect API key provided."


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyAuthenticator:
    """Accepts the configured keys; every failure looks the same to the caller."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def authenticate(self, request: Request) -> None:
        if request.url.query and any(p in request.query_params for p in _URL_KEY_PARAMS):
            raise AuthenticationFailed("API keys must be sent in the Authorization header, never in the URL.")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key"
            )
        candidate = _digest(token.strip())
        ok = False
        for d in self._digests:  # no early exit: same work for every key
            ok |= hmac.compare_digest(candidate, d)
        if not ok:
            raise AuthenticationFailed(_INVALID)
