"""Anthropic's Messages route: HTTP in and out, nothing else (the work is `GenerationService`'s, as for chat).

Errors on this route are Anthropic's envelope (`gateway.errors.shape_of`). No `from __future__ import
annotations` here: FastAPI reads the route annotations at registration.
"""

from typing import Any

from fastapi import APIRouter, Body, Request
from starlette.responses import Response

from gateway.protocol import MessagesCountRequest, MessagesRequest
from gateway.serving import GenerationService
from gateway.serving_tokens import TokenCountService

ANTHROPIC_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}},
    **{code: {"description": desc, "content": {"application/json": {}}} for code, desc in {
        400: "invalid_request_error", 401: "authentication_error (x-api-key or Authorization: Bearer)",
        403: "permission_error: the key may not call this endpoint (its allowed_endpoints)",
        404: "not_found_error: an unknown model, or one the key may not use", 413: "request_too_large",
        429: "rate_limit_error (Retry-After)", 503: "overloaded_error (Retry-After)", 504: "timeout_error",
    }.items()},
}


def anthropic_router(generation: GenerationService, tokens: TokenCountService) -> APIRouter:
    """`POST /v1/messages` (also reached by the app's direct path, `GatewayApp`, as chat is) and
    `POST /v1/messages/count_tokens`."""
    r = APIRouter(prefix="/v1")

    @r.post("/messages", responses=ANTHROPIC_RESPONSES)
    async def messages(request: Request, body: MessagesRequest = Body()) -> Response:  # noqa: B008
        return await generation.create("messages", request, body)

    @r.post("/messages/count_tokens", responses=ANTHROPIC_RESPONSES)
    async def count_tokens(request: Request, body: MessagesCountRequest = Body()) -> Response:  # noqa: B008
        return await tokens.count_messages(request, body)

    return r
