"""The token-count service: `POST /v1/messages/count_tokens`, a prompt's length as its engine counts it.

Nothing is generated: the key, its model list and one request against its rpm apply (`count_request`), no
token reservation and no ledger row. The count is the engine's own (vLLM's chat template and tokenizer); an
engine that cannot count (an upstream) says so with a 400 rather than answer an estimate.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.protocol import MessagesCountRequest, ensure_shallow
from gateway.serving import GenerationService, id_headers, request_id
from serve.errors import InvalidRequest


class TokenCountService:
    """Counts a Messages prompt for the model a key may use."""

    def __init__(self, generation: GenerationService) -> None:
        self.generation = generation

    async def count_messages(self, request: Request, typed: MessagesCountRequest) -> Response:
        """`typed`: the body as the route validated it."""
        gov = self.generation.gov
        caller = await gov.authenticate(request)
        await gov.authorize_endpoint(caller, "messages")
        body = typed.engine_body()
        ensure_shallow(body)
        engine, _ = await self.generation.resolve(caller, typed.model)
        await gov.count_request(caller)
        counted = await engine.count_prompt_tokens("messages", body)
        if counted is None:
            raise InvalidRequest(f"Model {typed.model!r} cannot count tokens here (its engine is an upstream, "
                                 "or it refused the request).", param="model")
        rid = request_id(request)
        return Response(orjson.dumps({"input_tokens": counted}), media_type="application/json",
                        headers=id_headers(request, rid))
