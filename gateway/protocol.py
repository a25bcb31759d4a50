"""Wire schemas of the requests the gateway validates before any engine sees them (OpenAI's, Anthropic's Messages).

One validated request drives everything: the engine receives its dump (`engine_body`: the values
as validated, so a `"2"` the schema coerced reaches the engine as the `2` quotas counted), and
quotas reserve its `demand`. Unknown fields are allowed and passed through (a new OpenAI field
needs no release); the engine validates what it alone knows (context length, template, logprob
limits). Every field that changes how much an engine generates is typed here.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.requests import Request

from gateway.errors import PayloadTooLarge
from gateway.governance.quota_policy import Demand, estimate_text_tokens
from serve.engine import Endpoint
from serve.errors import InvalidRequest, param_from_validation_error


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = Field(default=None, description="Send a final chunk with token usage.")


class _Request(BaseModel):
    """Every generation request: a model, unknown fields passed through to the engine."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="Model id or alias.")

    def engine_body(self) -> dict[str, Any]:
        """What the engine receives: the fields the client set, as validated (unknown ones as sent; a `stream`
        sent to an endpoint that does not stream is dropped: the engine answers in full)."""
        body = self.model_dump(exclude_unset=True)
        if "stream" not in type(self).model_fields:
            body.pop("stream", None)
        return body

    @property
    def streams(self) -> bool:
        """Whether the answer is an SSE stream (only where the endpoint has `stream`)."""
        return bool(getattr(self, "stream", False))

    def demand(self) -> Demand:
        """The most tokens the request may make its engine process (its quota reservation)."""
        raise NotImplementedError

    def end_user(self) -> str | None:
        """The caller's own id for its end user, for the ledger: OpenAI's `user` (or its successor
        `safety_identifier`); Anthropic's `metadata.user_id`."""
        for value in (getattr(self, "user", None), (self.model_extra or {}).get("safety_identifier")):
            if isinstance(value, str) and value:
                return value
        return None


class _Sampling(_Request):
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    prompt_cache_key: str | None = Field(
        default=None, description="Requests sharing it go to the replica that cached their prefix (conversation routing)."
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def demand(self) -> Demand:
        """Every message's text (4 tokens of framing each) and tool calls, the tool definitions the template
        renders into the prompt, then `n` choices of at most `max_completion_tokens`, else `max_tokens` (vLLM's
        precedence on chat)."""
        prompt = 2 + sum(4 + _text_tokens(m.content) + _json_tokens((m.model_extra or {}).get("tool_calls"))
                         for m in self.messages)
        prompt += sum(_json_tokens((self.model_extra or {}).get(k)) for k in RENDERED_EXTRAS)
        return Demand(prompt, n=self.n or 1, max_new_tokens=self.max_completion_tokens or self.max_tokens)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, description="Only 1 (or absent): vLLM no longer runs best_of.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError("best_of is not supported; ask for n choices instead")
        return v

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts of the request: a batch is a list of texts or of token lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return p  # type: ignore[return-value]

    def demand(self) -> Demand:
        """Every prompt of the batch, each generating `n` choices of at most `max_tokens` (vLLM ignores
        `max_completion_tokens` on completions, so it bounds nothing here)."""
        prompts = self.prompts()
        tokens = sum(len(p) if isinstance(p, list) else estimate_text_tokens(p) + 1 for p in prompts)
        return Demand(tokens, prompts=len(prompts), n=self.n or 1, max_new_tokens=self.max_tokens)


RENDERED_EXTRAS = ("tools", "functions", "response_format")  # request fields a chat template puts in the prompt


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesCountRequest(_Request):
    """`POST /v1/messages/count_tokens`: a Messages prompt, without what generation would add."""

    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(MessagesCountRequest):
    """`POST /v1/messages` (Anthropic's Messages API): the fields that bound what is generated, typed."""

    max_tokens: int = Field(ge=1, description="Required, as Anthropic's API has it.")
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    metadata: dict[str, Any] | None = None

    def end_user(self) -> str | None:
        user = (self.metadata or {}).get("user_id")
        return user if isinstance(user, str) and user else None

    def demand(self) -> Demand:
        """The system prompt, every message's text, tool-use inputs and tool results, the tool definitions, then
        one answer of at most `max_tokens`."""
        prompt = 2 + _blocks_tokens(self.system) + _json_tokens(self.tools)
        prompt += sum(4 + _blocks_tokens(m.content) for m in self.messages)
        return Demand(prompt, n=1, max_new_tokens=self.max_tokens)


class ResponsesRequest(_Request):
    """`POST /v1/responses` (OpenAI's Responses API): the fields that bound what is generated, typed.

    Responses are not stored (`store` is taken as false, as vLLM does without its store): a request that
    needs a stored one (`previous_response_id`, `background`) is refused naming the parameter.
    """

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        return v

    @field_validator("previous_response_id")
    @classmethod
    def _previous(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("responses are not stored here: send the conversation in `input` instead")
        return v

    @field_validator("background")
    @classmethod
    def _background(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("background responses are not supported (they need a stored response)")
        return v

    def demand(self) -> Demand:
        """The instructions, every input item's text (message parts, function-call arguments and outputs) and
        the tool definitions, then one answer of at most `max_output_tokens` (else the rest of the context)."""
        items = [{"content": self.input}] if isinstance(self.input, str) else self.input
        prompt = 2 + (estimate_text_tokens(self.instructions) if self.instructions else 0) + _json_tokens(self.tools)
        for item in items:
            content = item.get("content")
            prompt += 4 + _blocks_tokens(content if isinstance(content, str | list) else None)
            for key in ("arguments", "output"):
                if isinstance(value := item.get(key), str):
                    prompt += estimate_text_tokens(value)
        return Demand(prompt, n=1, max_new_tokens=self.max_output_tokens)


def _blocks_tokens(content: str | list[dict[str, Any]] | None) -> int:
    """Estimated tokens of Anthropic content: a string, or blocks (text, a tool_use's input, a tool_result's
    content, nested as Anthropic nests it)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_text_tokens(content)
    total = 0
    for block in content:
        if isinstance(text := block.get("text"), str):
            total += estimate_text_tokens(text)
        if "input" in block:
            total += _json_tokens(block["input"])
        inner = block.get("content")
        if isinstance(inner, str | list):
            total += _blocks_tokens(inner if isinstance(inner, str) else [b for b in inner if isinstance(b, dict)])
    return total


def _json_tokens(value: Any) -> int:
    """Estimated tokens of a JSON value rendered into the prompt (tool schemas, tool-call arguments)."""
    return 0 if value is None else estimate_text_tokens(orjson.dumps(value).decode())


def _text_tokens(content: str | list[dict[str, Any]] | None) -> int:
    """Estimated tokens of a message's content: its text, or its text parts (other parts count nothing here;
    the engine's exact count replaces the estimate where `prompt_token_count: engine`)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_text_tokens(content)
    return sum(estimate_text_tokens(t) for p in content if isinstance(t := p.get("text"), str))


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one embeddings request


def _embedding_inputs(value: Any) -> list[Any]:
    """An embeddings `input` as its list of inputs: a text or a token list is one, a list of either is many."""
    return [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings`: one vector per input, from a pooling (embedding) model.

    Nothing is generated: the reservation is the inputs' tokens, settled to the engine's count, and a batch
    is one request for rpm and max_concurrent (its inputs run in one engine step, not as many sequences).
    """

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, texts, a token list or token lists (at most 2048 inputs, none empty).")
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Truncate each vector (models trained for it).")
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        items = _embedding_inputs(v)
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        if any(len(item) == 0 for item in items):
            raise ValueError("an input must not be empty")
        return v

    def demand(self) -> Demand:
        """Every input's tokens (a token list: its length), and nothing generated."""
        tokens = sum(len(i) if isinstance(i, list) else estimate_text_tokens(i) + 1 for i in _embedding_inputs(self.input))
        return Demand(tokens, max_new_tokens=0)


class _RunsNoModel(_Request):
    """A request answered by the engine's tokenizer alone: it reserves no tokens (one request against rpm)."""

    def demand(self) -> Demand:
        return Demand(0, max_new_tokens=0)


class TokenizeRequest(_RunsNoModel):
    """`POST /tokenize` (vLLM's): a prompt's token ids, of a text (`prompt`) or of a chat rendered by the model's
    template (`messages`). Nothing runs in the model: one request against rpm, no tokens reserved."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either `prompt` (a text) or `messages` (a chat)")
        return self


class DetokenizeRequest(_RunsNoModel):
    """`POST /detokenize` (vLLM's): the text of token ids. Nothing runs in the model, as for tokenize."""

    tokens: list[int] = Field(description="Token ids of the model's vocabulary.")

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("token ids are not negative")
        return v


GenerationRequest = (ChatCompletionRequest | CompletionRequest | MessagesRequest | ResponsesRequest | EmbeddingRequest
                     | TokenizeRequest | DetokenizeRequest)
SCHEMAS: dict[Endpoint, type[GenerationRequest]] = {
    "chat": ChatCompletionRequest, "completion": CompletionRequest, "messages": MessagesRequest,
    "responses": ResponsesRequest, "embeddings": EmbeddingRequest, "tokenize": TokenizeRequest,
    "detokenize": DetokenizeRequest,
}


MAX_JSON_DEPTH = 64  # far beyond any OpenAI request (a tool's JSON schema included); deeper is an attack


def too_deep(doc: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON document nests lists and objects deeper than `limit` (iterative: no recursion)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest / PayloadTooLarge."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    ensure_shallow(body)
    return body


def ensure_shallow(doc: Any) -> None:
    """InvalidRequest if `doc` nests deeper than MAX_JSON_DEPTH (a token estimate or an engine would recurse)."""
    if too_deep(doc):
        raise InvalidRequest(f"The request body nests lists and objects deeper than {MAX_JSON_DEPTH} levels.")


def validate(endpoint: Endpoint, body: dict[str, Any]) -> GenerationRequest:
    """`body` as the endpoint's typed request, or InvalidRequest naming the offending parameter."""
    return parse(SCHEMAS[endpoint], body)


Typed = TypeVar("Typed", bound=BaseModel)


def parse(schema: type[Typed], body: dict[str, Any]) -> Typed:
    """`body` as `schema`, or InvalidRequest naming the offending parameter."""
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = param_from_validation_error(exc)
        msg = err.get("msg", "invalid value")
        raise InvalidRequest(f"Invalid value for '{param}': {msg}" if param else msg, param=param) from None
