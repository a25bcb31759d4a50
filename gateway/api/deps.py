"""Dependencies the routers share, as `Annotated` aliases that keep route signatures short.

No `from __future__ import annotations` here: FastAPI reads these annotations at route registration.
"""

from typing import Annotated

from fastapi import Depends, Request

from gateway.governance.records import KeyRecord


async def _caller(request: Request) -> KeyRecord:  # async: no thread-pool hop per request
    return await request.app.state.governance.authenticate(request)


CallerDep = Annotated[KeyRecord, Depends(_caller)]
