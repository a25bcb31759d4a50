"""The vLLM engine: `AsyncLLM` driven through vLLM's own OpenAI serving classes.

Chat templating, sampling parameters, stop strings, `n`, logprobs and usage come from
vLLM's `OpenAIServingChat` / `OpenAIServingCompletion` / `OpenAIServingResponses` /
`AnthropicServingMessages` (built by
vLLM's `init_app_state` from vLLM's own argument parser, so defaults match `vllm serve`).
This module only adapts their results to the engine interface and normalises errors.
vLLM is imported inside methods: importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from serve.artifact import Artifact
from serve.config import ModelDeploymentConfig
from serve.engine import SCHEDULED, Endpoint, Engine, EngineResult, EngineStats, InflightLimiter, ModelCard
from serve.engine_metrics import SchedulerLoad, engine_stat_loggers
from serve.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineFailure,
    EngineUnavailable,
    InvalidRequest,
    error_for_status,
    param_from_validation_error,
)
from serve.hardware import cpu_worker_binding
from serve.vllm_args import parse_engine_args

logger = logging.getLogger(__name__)

_ERROR_PREFIX = 'data: {"error"'
_ANTHROPIC_ERROR_PREFIX = "event: error\n"  # a Messages stream's failure: Anthropic's error event, no status
# vLLM's gauges and counters reach Ray's metrics export at most this often (serve/engine_metrics.py).
ENGINE_METRICS_FLUSH_S = 1.0


_CONTEXT_PARAMS = {"input_tokens", "max_tokens", "max_completion_tokens"}


def _error_from_vllm(status: int, message: str, param: str | None, prompt_param: str = "messages") -> EngineError:
    """vLLM's (status, param) as our error; vLLM names the prompt `input_tokens`."""
    if status in (400, 422) and param in _CONTEXT_PARAMS:
        return ContextLengthExceeded(message, param=prompt_param if param == "input_tokens" else param)
    return error_for_status(status, message, param=param)


@dataclass(frozen=True)
class _Route:
    """How this engine runs one endpoint with vLLM's own serving object."""

    serving: Any  # vLLM's serving object (its `create_error_response` maps vLLM's exceptions)
    parse: Callable[[dict[str, Any]], Any]  # the body as vLLM's request model
    run: Callable[[Any], Awaitable[Any]]  # the request to vLLM's result (a response model, a stream, or an error)
    encode: Callable[[Any], bytes]  # a full result as the body vLLM's own server sends
    prompt_param: str = "messages"  # what vLLM's `input_tokens` is called on this endpoint


# What each endpoint is called in a refusal: "model X does not serve <this>".
_SERVES = {"chat": "chat completions", "completion": "text completions", "messages": "messages",
           "responses": "responses", "embeddings": "embeddings"}


def _dump(result: Any) -> bytes:
    return orjson.dumps(result.model_dump())


def _spec_dump(result: Any) -> bytes:
    return orjson.dumps(spec_clean(result.model_dump()))


class VLLMEngine(Engine):
    """`AsyncLLM` plus vLLM's OpenAI serving objects, in this process."""

    def __init__(self, cfg: ModelDeploymentConfig, artifact: Artifact) -> None:
        self.cfg = cfg
        self.model_path = artifact.path
        self.served_name = artifact.served_name
        variant = artifact.variant
        self.quantization = variant.quantization if variant else None
        self._card = ModelCard(
            id=artifact.served_name, created=artifact.created, root=artifact.root, engine="vllm",
            scheduling=cfg.vllm_args().get("scheduling_policy") or "fcfs", variant=variant.name if variant else None, quantization=self.quantization,
        )
        self._engine: Any = None
        self._routes: dict[Endpoint, _Route] = {}
        self._models: Any = None
        self._vocab_size = 0
        self.adapters: set[str] = set()
        self._count_tokens_request_cls: Any = None
        self._admission = InflightLimiter(0)  # sized from the engine's own batch size once it has started
        self._load = SchedulerLoad()  # kept current by a vLLM stat logger (serve/engine_metrics.py)

    @property
    def card(self) -> ModelCard:
        return self._card

    async def start(self) -> None:
        from pydantic import TypeAdapter
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
        from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = parse_engine_args(self.cfg, self.model_path, self.served_name, self.quantization)
        engine_args = AsyncEngineArgs.from_cli_args(args)

        def build() -> tuple[Any, Any]:
            # Blocking (config from disk, engine-core process start and handshake: seconds to
            # a minute): off the event loop, so engines already serving here keep streaming
            # while a new version starts beside them. AsyncLLM starts its output handler on
            # the first request when built outside a loop.
            config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            with cpu_worker_binding(self.cfg.workers_per_engine if self.cfg.hardware == "cpu" else 1):
                engine = AsyncLLM.from_vllm_config(
                    vllm_config=config,
                    usage_context=UsageContext.OPENAI_API_SERVER,
                    enable_log_requests=False,
                    disable_log_stats=engine_args.disable_log_stats,
                    stat_loggers=engine_stat_loggers(ENGINE_METRICS_FLUSH_S, self._load),
                )
            return config, engine

        vllm_config, self._engine = await asyncio.to_thread(build)
        state = State()
        tasks = await self._engine.get_supported_tasks()
        await init_app_state(self._engine, state, args, tasks)
        # vLLM builds the serving objects of what the model does: generation, or a pooling task (embeddings).
        chat, completion = getattr(state, "openai_serving_chat", None), getattr(state, "openai_serving_completion", None)
        messages, responses = getattr(state, "anthropic_serving_messages", None), getattr(state, "openai_serving_responses", None)
        embedding, tokens = getattr(state, "serving_embedding", None), state.serving_tokenization
        routes: dict[Endpoint, _Route | None] = {
            "chat": chat and _Route(chat, ChatCompletionRequest.model_validate,
                                    lambda r: chat.create_chat_completion(r, None), _spec_dump),
            "completion": completion and _Route(completion, CompletionRequest.model_validate,
                                                lambda r: completion.create_completion(r, None), _spec_dump, "prompt"),
            # as vLLM's own /v1/messages and /v1/responses answer
            "messages": messages and _Route(messages, AnthropicMessagesRequest.model_validate,
                                            lambda r: messages.create_messages(r, None),
                                            lambda r: orjson.dumps(r.model_dump(exclude_none=True))),
            "responses": responses and _Route(responses, ResponsesRequest.model_validate,
                                              lambda r: responses.create_responses(r, None),
                                              lambda r: orjson.dumps(r.model_dump(mode="json", by_alias=True)), "input"),
            # vLLM's embedding serving answers with its HTTP response (orjson-encoded arrays): its body as it is
            "embeddings": embedding and _Route(embedding, TypeAdapter(EmbeddingRequest).validate_python,
                                               lambda r: embedding(r, None), lambda r: bytes(r.body), "input"),
            "tokenize": _Route(tokens, TypeAdapter(TokenizeRequest).validate_python,
                               lambda r: tokens.create_tokenize(r, None), _dump, "prompt"),
            "detokenize": _Route(tokens, DetokenizeRequest.model_validate,
                                 lambda r: tokens.create_detokenize(r, None), _dump, "tokens"),
        }
        self._routes = {e: r for e, r in routes.items() if r is not None}
        self._models = state.openai_serving_models
        self._count_tokens_request_cls = AnthropicCountTokensRequest
        model_config, scheduler = vllm_config.model_config, vllm_config.scheduler_config
        self._vocab_size = _tokenizer_size(tokens.renderer.get_tokenizer(), model_config.get_vocab_size())
        queued = self.cfg.max_queued_requests
        self._admission.limit = scheduler.max_num_seqs + queued if queued >= 0 else 1 << 30
        self._card = self._card.model_copy(update={
            "max_model_len": model_config.max_model_len, "dtype": str(model_config.dtype).removeprefix("torch."),
            "scheduling": scheduler.policy,
        })
        logger.info("vLLM engine ready: %s (%s)", self.served_name, self.model_path)

    async def check_health(self) -> None:
        if self._engine is None:
            raise EngineUnavailable("engine is starting")
        try:
            await self._engine.check_health()
        except Exception as exc:  # EngineDeadError and friends
            raise EngineUnavailable(f"engine unhealthy: {exc}") from exc

    def stats(self) -> EngineStats:
        if self._engine is None:
            return EngineStats(running=0, healthy=False)
        running = self._engine.output_processor.get_num_unfinished_requests()
        # The scheduler reports on steps only: once idle, its last report (blocks of requests that just ended) is stale.
        waiting, kv = (self._load.waiting, self._load.kv_cache_usage) if running else (0, 0.0)
        return EngineStats(running=running, admitted=self._admission.count, healthy=not self._engine.errored,
                           waiting=waiting, kv_cache_usage=kv)

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        if self._models is None or not self.cfg.lora:
            raise EngineUnavailable(f"{self.served_name} was not started with LoRA support (set `lora`)")
        result = await self._models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
        error = getattr(result, "error", None)
        if error is not None:
            raise EngineFailure(f"adapter {name}: {error.message}")
        self.adapters.add(name)

    async def unload_adapter(self, name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        self.adapters.discard(name)
        if self._models is not None:
            await self._models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))

    def _for_engine(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` naming what this engine serves: the adapter asked for, else the served model (not an alias)."""
        model = body.get("model")
        return {**body, "model": model if model in self.adapters else self.served_name}

    async def count_prompt_tokens(self, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        """vLLM's own rendering of the request (chat template, tokenizer), as `generate` will do it again."""
        route = self._routes.get(endpoint)
        if self._engine is None or route is None or endpoint not in ("chat", "completion", "messages", "responses"):
            return None  # an embedding input is counted as it runs
        body = self._for_engine(body)
        try:
            if endpoint == "messages":
                counted = await route.serving.count_tokens(self._count_tokens_request_cls.model_validate(body))
                return None if getattr(counted, "error", None) is not None else int(counted.input_tokens) or None
            request = route.parse(body)
            if endpoint == "responses":  # without history: a request that names one is refused before this
                rendered = await route.serving.online_renderer.render_responses(
                    request, tool_server=route.serving.tool_server, skip_mm_cache=True)
            elif endpoint == "chat":
                rendered = await route.serving.render_chat_request(request)
            else:
                rendered = await route.serving.render_completion_request(request)
        except Exception:  # noqa: BLE001 - a request vLLM refuses is refused by `generate`, with its message
            return None
        if getattr(rendered, "error", None) is not None:
            return None
        # chat: (conversation, engine inputs); Responses: one rendered input; completions: a batch's inputs
        inputs = rendered[1] if endpoint == "chat" else [rendered.engine_input] if endpoint == "responses" else rendered
        if not inputs:
            return None
        counts = [len(i.get("prompt_token_ids") or ()) for i in inputs if isinstance(i, dict)]
        return sum(counts) if counts and all(counts) else None

    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        if self._engine is None:
            raise EngineUnavailable("engine is starting")
        if self._engine.errored:
            raise EngineUnavailable(ENGINE_DEAD)
        return await self._admission.admit(lambda: self._generate(endpoint, body, request_id))

    async def _generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        from pydantic import ValidationError

        route = self._routes.get(endpoint)
        if route is None:
            kind = "a generation" if "chat" in self._routes else "an embedding"
            raise InvalidRequest(f"Model {self.served_name!r} does not serve {_SERVES[endpoint]}: it is {kind} model.",
                                 param="model")
        body = self._for_engine(body)
        if endpoint in SCHEDULED and endpoint != "messages":  # Anthropic's request has no field for it
            body["request_id"] = request_id
        if endpoint == "detokenize":
            self._check_token_ids(body.get("tokens"))
        try:
            result = await route.run(route.parse(body))
        except ValidationError as exc:
            raise InvalidRequest(_first_message(exc), param=param_from_validation_error(exc)) from None
        except EngineError:
            raise
        except Exception as exc:
            if self._engine is not None and self._engine.errored:  # its engine-core process is gone
                raise EngineUnavailable(ENGINE_DEAD) from None
            # vLLM's own exception -> status mapping (VLLMValidationError -> 400 with parameter, ...)
            result = route.serving.create_error_response(exc)
        error = getattr(result, "error", None)
        if error is not None:
            if self._engine is not None and self._engine.errored:
                raise EngineUnavailable(ENGINE_DEAD)
            raise _error_from_vllm(int(error.code), error.message, error.param, route.prompt_param)
        if hasattr(result, "__aiter__"):
            return self._stream(_named_events(result) if endpoint == "responses" else result, route.prompt_param)
        return route.encode(result)

    def _check_token_ids(self, tokens: Any) -> None:
        """A token id past the vocabulary is the client's mistake (vLLM's tokenizer would fail on it)."""
        if isinstance(tokens, list):
            bad = next((t for t in tokens if isinstance(t, int) and not 0 <= t < self._vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"Token id {bad} is outside the vocabulary of {self.served_name!r} "
                                     f"(0 to {self._vocab_size - 1}).", param="tokens")

    async def _stream(self, gen: AsyncGenerator[str, None], prompt_param: str) -> AsyncIterator[bytes]:
        try:
            async for item in gen:
                if item.startswith((_ERROR_PREFIX, _ANTHROPIC_ERROR_PREFIX)):
                    if self._engine is not None and self._engine.errored:  # its engine-core process is gone
                        raise EngineUnavailable(ENGINE_DEAD)
                    if item.startswith(_ANTHROPIC_ERROR_PREFIX):
                        raise EngineFailure("The engine failed while streaming the message.")
                    err = orjson.loads(item[6:])["error"]
                    raise _error_from_vllm(int(err.get("code") or 500), err.get("message", ""), err.get("param"), prompt_param)
                yield item.encode()
        finally:
            await gen.aclose()

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            # Off the event loop: vLLM joins its engine-core process here (seconds), and this replica
            # goes on serving the new version's traffic meanwhile.
            await asyncio.to_thread(engine.shutdown)


def _tokenizer_size(tokenizer: Any, model_vocab: int) -> int:
    """Ids the tokenizer can decode: its own length (a model's embedding table may be padded past it)."""
    try:
        return min(len(tokenizer), model_vocab) or model_vocab
    except TypeError:  # a tokenizer without a length
        return model_vocab


ENGINE_DEAD = "The engine stopped; its replica is being restarted. Retry shortly."


async def _named_events(events: AsyncGenerator[Any, None]) -> AsyncGenerator[str, None]:
    """vLLM's Responses stream (event objects) as the SSE its server sends: `event: <type>` and the JSON."""
    try:
        async for event in events:
            yield f"event: {getattr(event, 'type', 'unknown')}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
    finally:
        await events.aclose()

# Fields vLLM sets to null where OpenAI's spec allows only an object/array or absence.
_NON_NULLABLE_MESSAGE = ("annotations", "function_call", "audio", "tool_calls")
_NON_NULLABLE_USAGE = ("prompt_tokens_details", "completion_tokens_details")


def spec_clean(body: dict[str, Any]) -> dict[str, Any]:
    """Drop the null fields that OpenAI's schema does not allow (non-streaming bodies)."""
    for choice in body.get("choices") or ():
        message = choice.get("message")
        if isinstance(message, dict):
            for key in _NON_NULLABLE_MESSAGE:
                if message.get(key, 0) is None or message.get(key) == []:
                    message.pop(key, None)
    usage = body.get("usage")
    if isinstance(usage, dict):
        for key in _NON_NULLABLE_USAGE:
            if usage.get(key, 0) is None:
                usage.pop(key)
    return body


def _first_message(exc: Any) -> str:
    errs = exc.errors()
    return errs[0].get("msg", str(exc)) if errs else str(exc)
