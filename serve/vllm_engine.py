"""The vLLM engine: `AsyncLLM` driven through vLLM's own OpenAI serving classes.

Chat templating, sampling parameters, stop strings, `n`, logprobs and usage come from
vLLM's `OpenAIServingChat` / `OpenAIServingCompletion` (built by vLLM's
`init_app_state` from vLLM's own argument parser, so defaults match `vllm serve`).
This module only adapts their results to the engine interface and normalises errors.
vLLM is imported inside methods: importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from serve.config import ModelDeploymentConfig
from serve.engine import Endpoint, Engine, EngineResult, EngineStats, InflightLimiter, ModelCard
from serve.engine_metrics import ray_stat_loggers
from serve.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineFailure,
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
    param_from_validation_error,
)
from serve.hardware import cpu_supports_bf16
from serve.vllm_plugin import SPIN_ENV

if TYPE_CHECKING:
    from serve.factory import Artifact

logger = logging.getLogger(__name__)

_ERROR_PREFIX = 'data: {"error"'
# vLLM's in-process executor (`cpu_executor: uni`), named by import path: vLLM's CPU platform turns the short
# name "uni" back into "mp".
UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"
T = TypeVar("T")


def engine_cli_args(
    cfg: ModelDeploymentConfig, model_path: str, served_name: str, quantization: str | None = None
) -> list[str]:
    """vLLM command-line arguments for a deployment (what `vllm serve` would get)."""
    args = [
        "--model", model_path,
        "--served-model-name", served_name,
        "--max-num-seqs", str(cfg.max_num_seqs),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--pipeline-parallel-size", str(cfg.pipeline_parallel_size),
        "--generation-config", "vllm",
        "--scheduling-policy", cfg.scheduling_policy,
    ]
    if cfg.max_model_len:
        args += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.num_gpus == 0 and "dtype" not in cfg.engine_kwargs and not cpu_supports_bf16():
        # vLLM's `auto` takes the checkpoint's bf16, which this CPU only emulates.
        args += ["--dtype", "float32"]
    if cfg.stream_interval > 1 and "stream_interval" not in cfg.engine_kwargs:
        args += ["--stream-interval", str(cfg.stream_interval)]
    if cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1:
        args += ["--distributed-executor-backend", "ray"]
    elif engine_executor(cfg) == "uni":
        args += ["--distributed-executor-backend", UNIPROC_EXECUTOR]
    if quantization and quantization.startswith("bnb"):
        args += ["--quantization", "bitsandbytes"]  # vLLM also reads it from config.json; explicit is clearer
    if cfg.lora is not None:
        args += ["--enable-lora", "--max-loras", str(cfg.lora.max_loras), "--max-lora-rank", str(cfg.lora.max_lora_rank)]
        if cfg.lora.max_cpu_loras:
            args += ["--max-cpu-loras", str(cfg.lora.max_cpu_loras)]
    for key, value in cfg.engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (dict, list)):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def engine_executor(cfg: ModelDeploymentConfig) -> str | None:
    """The CPU executor a deployment's engine runs ("mp" or "uni"; None on GPUs or where engine_kwargs names one)."""
    if cfg.num_gpus > 0 or "distributed_executor_backend" in cfg.engine_kwargs:
        return None
    return cfg.cpu_executor


_CONTEXT_PARAMS = {"input_tokens", "max_tokens", "max_completion_tokens"}


def _error_from_vllm(status: int, message: str, param: str | None, prompt_param: str = "messages") -> EngineError:
    """Map vLLM's (status, param) to our error types; vLLM names the prompt `input_tokens`."""
    if status in (400, 422, 501):
        if param in _CONTEXT_PARAMS:
            return ContextLengthExceeded(message, param=prompt_param if param == "input_tokens" else param)
        return InvalidRequest(message, param=param)
    if status == 503:
        return EngineUnavailable(message)
    if status == 429:
        return EngineOverloaded(message)
    return EngineFailure(message)


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
            scheduling=cfg.scheduling_policy, variant=variant.name if variant else None, quantization=self.quantization,
        )
        self._engine: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._models: Any = None
        self.adapters: set[str] = set()
        self._chat_request_cls: Any = None
        self._completion_request_cls: Any = None
        limit = cfg.max_num_seqs + cfg.max_queued_requests if cfg.max_queued_requests >= 0 else 1 << 30
        self._admission = InflightLimiter(limit)

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def engine_nice(self) -> int:
        """Nice levels the engine's processes run below this replica, ahead of it if negative (CPU engines only)."""
        return self.cfg.engine_nice if self.cfg.num_gpus == 0 else 0

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        argv = engine_cli_args(self.cfg, self.model_path, self.served_name, self.quantization)
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        engine_args = AsyncEngineArgs.from_cli_args(args)

        def build() -> tuple[Any, Any]:
            # Blocking (config from disk, engine-core process start and handshake: seconds to
            # a minute): off the event loop, so engines already serving here keep streaming
            # while a new version starts beside them. AsyncLLM starts its output handler on
            # the first request when built outside a loop.
            config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            # The engine-core process inherits the mask of the thread that spawns it; vLLM's own
            # `auto` OpenMP binding then stays inside it. Everything else in this process keeps its own.
            # The spin is read by raygate's vLLM plugin in the engine processes spawned here (they inherit it).
            spin = None if self.cfg.engine_spin_s is None else repr(self.cfg.engine_spin_s)
            with _thread_affinity(self.cfg.cpu_affinity), _thread_nice(self.engine_nice), _environ(SPIN_ENV, spin):
                engine = AsyncLLM.from_vllm_config(
                    vllm_config=config,
                    usage_context=UsageContext.OPENAI_API_SERVER,
                    enable_log_requests=False,
                    disable_log_stats=engine_args.disable_log_stats,
                    stat_loggers=ray_stat_loggers(self.cfg.engine_metrics_flush_s),
                )
            return config, engine

        vllm_config, self._engine = await in_own_thread(build)
        state = State()
        tasks = await self._engine.get_supported_tasks()
        await init_app_state(self._engine, state, args, tasks)
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._models = state.openai_serving_models
        self._chat_request_cls = ChatCompletionRequest
        self._completion_request_cls = CompletionRequest
        model_config = vllm_config.model_config
        self._card = self._card.model_copy(
            update={"max_model_len": model_config.max_model_len, "dtype": str(model_config.dtype).removeprefix("torch.")}
        )
        logger.info("vLLM engine ready: %s (%s) on cores %s, nice %+d from its replica, CPU executor %s, queues spin %s",
                    self.served_name, self.model_path, self.cfg.cpu_affinity or "all", self.engine_nice,
                    engine_executor(self.cfg) or "-",
                    "vLLM's 1 s" if self.cfg.engine_spin_s is None else f"{self.cfg.engine_spin_s:g} s")

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
        return EngineStats(running=running, admitted=self._admission.count, healthy=not self._engine.errored)

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        if self._models is None or self.cfg.lora is None:
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
        if self._engine is None:
            return None
        body = self._for_engine(body)
        try:
            if endpoint == "chat":
                rendered = await self._chat.render_chat_request(self._chat_request_cls.model_validate(body))
            else:
                rendered = await self._completion.render_completion_request(
                    self._completion_request_cls.model_validate(body)
                )
        except Exception:  # noqa: BLE001 - a request vLLM refuses is refused by `generate`, with its message
            return None
        if getattr(rendered, "error", None) is not None:
            return None
        inputs = rendered[1] if endpoint == "chat" else rendered  # chat: (conversation, engine inputs)
        if not inputs:
            return None
        counts = [len(i.get("prompt_token_ids") or ()) for i in inputs if isinstance(i, dict)]
        return sum(counts) if counts and all(counts) else None

    async def generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        if self._engine is None:
            raise EngineUnavailable("engine is starting")
        return await self._admission.admit(lambda: self._generate(endpoint, body, request_id))

    async def _generate(self, endpoint: Endpoint, body: dict[str, Any], request_id: str) -> EngineResult:
        from pydantic import ValidationError

        body = {**self._for_engine(body), "request_id": request_id}
        prompt_param = "messages" if endpoint == "chat" else "prompt"
        serving = self._chat if endpoint == "chat" else self._completion
        try:
            if endpoint == "chat":
                request = self._chat_request_cls.model_validate(body)
                result = await self._chat.create_chat_completion(request, None)
            else:
                request = self._completion_request_cls.model_validate(body)
                result = await self._completion.create_completion(request, None)
        except ValidationError as exc:
            raise InvalidRequest(_first_message(exc), param=param_from_validation_error(exc)) from None
        except EngineError:
            raise
        except Exception as exc:
            # vLLM's own exception -> status mapping (VLLMValidationError -> 400 with parameter, ...)
            result = serving.create_error_response(exc)
        error = getattr(result, "error", None)
        if error is not None:
            raise _error_from_vllm(int(error.code), error.message, error.param, prompt_param)
        if hasattr(result, "__aiter__"):
            return self._stream(result, prompt_param)
        return orjson.dumps(spec_clean(result.model_dump()))

    async def _stream(self, gen: AsyncIterator[str], prompt_param: str) -> AsyncIterator[bytes]:
        try:
            async for item in gen:
                if item.startswith(_ERROR_PREFIX):
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


async def in_own_thread(fn: Callable[[], T]) -> T:
    """`fn()` off the event loop in a thread that ends with it: what `fn` sets for its thread
    (niceness cannot be raised back without privileges) never reaches a pooled thread."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-engine-start")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)
    finally:
        pool.shutdown(wait=False)


@contextlib.contextmanager
def _thread_nice(increment: int) -> Iterator[None]:
    """Run the body with the calling thread `increment` nice levels lower, higher if negative (processes it
    spawns inherit it). Higher takes CAP_SYS_NICE: without it the thread keeps its level and a warning says so.

    On Linux niceness is per thread: the rest of the process keeps its own. It is not restored
    (lowering it again takes CAP_SYS_NICE): run this in a thread of its own (`in_own_thread`).
    """
    if increment:
        try:
            os.nice(increment)
        except PermissionError:  # a level above the replica's takes CAP_SYS_NICE (or RLIMIT_NICE)
            logger.warning("cannot run vLLM's engine processes %d nice levels above their replica here "
                           "(no CAP_SYS_NICE): they keep the replica's level", -increment)
    yield


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """`name` set to `value` (None: as it is) for processes spawned inside, restored after."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _thread_affinity(cores: list[int] | None) -> Iterator[None]:
    """Run the body with the calling thread pinned to `cores` (processes it spawns inherit them)."""
    if not cores:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
