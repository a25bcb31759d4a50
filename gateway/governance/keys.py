"""API key format and hashing: plaintext exists only at creation, the store keeps an HMAC."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "rg-"
PREFIX_LEN = 11  # "rg-" + 8 characters: shown in listings to tell keys apart


def new_key() -> str:
    """A fresh key: `rg-` + 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_prefix(key: str) -> str:
    return key[:PREFIX_LEN]


def hash_key(secret: bytes, key: str) -> str:
    """HMAC-SHA256 of the key under the server secret, hex. A leaked table alone reveals nothing."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()

