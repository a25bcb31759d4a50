"""The OpenAI-compatible front door: routes, auth, errors. Build it with `create_app`."""

from gateway.app import create_app

__all__ = ["create_app"]
