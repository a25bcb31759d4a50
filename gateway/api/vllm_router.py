"""vLLM's own routes beside OpenAI's: `POST /tokenize` and `POST /detokenize` (at the root, as `vllm serve` has them).

A key's model list, its endpoint list and one request against its rpm apply; nothing runs in the model, so no
tokens are reserved. No `from __future__ import annotations` here: FastAPI reads the route annotations.
"""

from fastapi import APIRouter, Body, Request
from starlette.responses import Response

from gateway.api.openai_router import ERROR_RESPONSES
from gateway.protocol import DetokenizeRequest, TokenizeRequest
from gateway.serving import GenerationService


def vllm_router(generation: GenerationService) -> APIRouter:
    """`POST /tokenize` (a text, or a chat through the model's template) and `POST /detokenize`."""
    r = APIRouter()

    @r.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(request: Request, body: TokenizeRequest = Body()) -> Response:  # noqa: B008
        return await generation.create("tokenize", request, body)

    @r.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(request: Request, body: DetokenizeRequest = Body()) -> Response:  # noqa: B008
        return await generation.create("detokenize", request, body)

    return r
