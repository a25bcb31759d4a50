"""OpenAI's routes: HTTP in and out, nothing else (the work is in `gateway/serving*.py`).

No `from __future__ import annotations` here: FastAPI reads the route annotations (the request models
the OpenAPI document shows) at registration.
"""

from typing import Any

import orjson
from fastapi import APIRouter, Body, Request
from starlette.responses import Response

from gateway.api.deps import CallerDep
from gateway.errors import NotFound
from gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest
from gateway.serving import GenerationService
from gateway.serving_models import ModelCatalog

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": {"application/json": {}}}
    for code, desc in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        403: "The key may not call this endpoint (its allowed_endpoints)",
        404: "Unknown model, or one the key may not use (they look the same)",
        413: "Request body too large",
        429: "Rate limit or budget exceeded (Retry-After, x-ratelimit-*)",
        503: "Engine overloaded or unavailable (Retry-After)",
        504: "The request did not finish in time",
    }.items()
}
STREAM_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}, **ERROR_RESPONSES,
}


def _json(doc: Any) -> Response:
    return Response(orjson.dumps(doc), media_type="application/json")


def _not_stored(response_id: str) -> NotFound:
    return NotFound(f"No response {response_id!r} is stored: this gateway does not store responses (as vLLM's "
                    "server, `store` is taken as false); send the conversation in `input`.", param="response_id")


def openai_router(generation: GenerationService, catalog: ModelCatalog) -> APIRouter:
    """`/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/embeddings`.

    The POST routes are also reached without this router, by the app's direct path
    (`GatewayApp`): all end in `generation.create`. Their typed body is what the OpenAPI document shows; FastAPI
    validates it here, and the service takes it as it is.
    """
    r = APIRouter(prefix="/v1")

    @r.get("/models", responses=ERROR_RESPONSES)
    async def list_models(caller: CallerDep) -> Response:
        return _json(catalog.list(caller))

    @r.get("/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def get_model(model_id: str, caller: CallerDep) -> Response:
        return _json(catalog.get(caller, model_id))

    @r.post("/chat/completions", responses=STREAM_OR_JSON)
    async def chat_completions(request: Request, body: ChatCompletionRequest = Body()) -> Response:  # noqa: B008
        return await generation.create("chat", request, body)

    @r.post("/completions", responses=STREAM_OR_JSON)
    async def completions(request: Request, body: CompletionRequest = Body()) -> Response:  # noqa: B008
        return await generation.create("completion", request, body)

    @r.post("/responses", responses=STREAM_OR_JSON)
    async def responses(request: Request, body: ResponsesRequest = Body()) -> Response:  # noqa: B008
        return await generation.create("responses", request, body)

    @r.post("/embeddings", responses=ERROR_RESPONSES)
    async def embeddings(request: Request, body: EmbeddingRequest = Body()) -> Response:  # noqa: B008
        return await generation.create("embeddings", request, body)

    @r.get("/responses/{response_id}", responses=ERROR_RESPONSES)
    async def get_response(response_id: str, caller: CallerDep) -> Response:
        raise _not_stored(response_id)

    @r.delete("/responses/{response_id}", responses=ERROR_RESPONSES)
    async def delete_response(response_id: str, caller: CallerDep) -> Response:
        raise _not_stored(response_id)

    return r
