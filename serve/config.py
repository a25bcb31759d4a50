"""Typed configuration of model deployments (YAML, dict or object)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# raygate's vLLM arguments where engine_kwargs names none, on every engine. A fixed batch size keeps the gateway's
# admission (max_num_seqs + max_queued_requests) in step with the engine; `priority` lets key tiers order
# requests; `vllm` takes sampling defaults from the request, not the checkpoint's generation_config.json.
VLLM_DEFAULTS: dict[str, Any] = {
    "max_num_seqs": 256, "scheduling_policy": "priority", "generation_config": "vllm",
    # usage.prompt_tokens_details.cached_tokens, as OpenAI reports it: what the prefix cache saved each request.
    "enable_prompt_tokens_details": True,
}
# ... and on CPU engines: a KV cache of 1 GiB (vLLM's CPU default takes a share of the host's memory, which several
# engines on one host would each claim).
CPU_VLLM_DEFAULTS: dict[str, Any] = {"kv_cache_memory_bytes": 1 << 30}
# Arguments raygate derives from the model it serves.
RESERVED_VLLM_ARGS = frozenset({"model", "served_model_name"})


class AutoscalingConfig(BaseModel):
    """Serve autoscaling of a deployment's replicas (the gateway's, or a model's own)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas, also at start.")
    max_replicas: int = Field(default=2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        default=64, gt=0, description="Requests in flight per replica that Serve steers towards."
    )
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Load must stay above target this long to add.")
    downscale_delay_s: float = Field(default=120.0, ge=0, description="Load must stay below target this long to remove.")
    metrics_interval_s: float = Field(default=2.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(default=10.0, gt=0, description="Window the load is averaged over.")
    target_kv_cache_usage: float | None = Field(
        default=0.8, gt=0, le=1,
        description="Share of KV cache in use per replica (its engines' fullest, as vLLM reports it) that Serve "
        "steers towards, beside target_ongoing_requests: replicas are added when either asks for more. It scales "
        "out long prompts and outputs that fill the cache before the request count is high. null: requests only.",
    )

    def serve_options(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`: these fields, and raygate's policy reading the engines' KV cache use."""
        opts = self.model_dump(exclude={"target_kv_cache_usage"})
        if self.target_kv_cache_usage is not None:
            opts["policy"] = {"policy_function": "serve.autoscaling_policy:EngineLoadPolicy",
                              "policy_kwargs": {"target_kv_cache_usage": self.target_kv_cache_usage}}
        return opts

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class FakeEngineConfig(BaseModel):
    """Knobs of the deterministic fake engine."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float = Field(default=0.0, ge=0, description="Delay before the first token, in ms.")
    itl_ms: float = Field(default=0.0, ge=0, description="Delay between tokens, in ms.")
    default_max_tokens: int = Field(default=16, ge=1, description="Tokens generated when max_tokens is not set.")
    max_model_len: int = Field(default=2048, ge=16, description="Context length the fake enforces.")
    fail_rate: float = Field(default=0.0, ge=0, le=1, description="Share of requests that fail (seeded, deterministic).")
    fail_after_tokens: int | None = Field(
        default=None, ge=0, description="If set, failing requests fail after this many streamed tokens."
    )
    max_running: int = Field(default=10_000, ge=1, description="Concurrent requests before it answers overloaded.")
    start_s: float = Field(default=0.0, ge=0, description="How long the engine takes to start, to test readiness and roll-outs against a slow start.")
    start_error: str | None = Field(default=None, description="If set, the engine's start fails with this message.")


class UpstreamConfig(BaseModel):
    """An OpenAI-compatible server the gateway forwards to (engine `openai`)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="Upstream base URL including `/v1`, e.g. http://10.0.0.5:8000/v1.")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the upstream's API key (never the key itself)."
    )
    max_model_len: int | None = Field(default=None, ge=16, description="Upstream context length, for token reservations.")
    max_connections: int = Field(default=1024, ge=1, description="Concurrent upstream requests (pooled connections).")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Longest wait for a connection.")
    read_timeout_s: float = Field(default=600.0, gt=0, description="Longest silence from the upstream mid-response.")


class ModelDeploymentConfig(BaseModel):
    """One model: its engine runs inside each gateway replica (co-located, no handle hop) or in a deployment of its own."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Registry reference (`name`, `name@3`, `name@stable`) or a checkpoint directory.")
    served_name: str | None = Field(
        default=None, description="Model id clients use; defaults to the registry name (or the directory name)."
    )
    engine: Literal["vllm", "fake", "openai"] = Field(
        default="vllm", description="Engine: vLLM, the fake engine, or an upstream OpenAI-compatible server (`upstream`)."
    )
    upstream: UpstreamConfig | None = Field(default=None, description="Where engine `openai` forwards (`model` is the upstream's name).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments, named as on `vllm serve`'s command line in snake_case "
        "(`max_model_len`, `tensor_parallel_size`, `gpu_memory_utilization`, ...): the one place vLLM is configured. "
        "Checked against vLLM's own argument parser when the application is built, so a misspelt name fails at start. "
        "raygate's defaults (docs/configuration.md, 'vLLM arguments') apply where a name is absent.",
    )
    fake: FakeEngineConfig = Field(default_factory=FakeEngineConfig, description="Fake engine knobs.")
    num_cpus: float = Field(
        default=0.5, ge=0,
        description="CPUs Ray reserves for this engine (added to the gateway replica's); raise it on larger hosts "
        "so Ray does not schedule other work onto the engine's cores.",
    )
    num_gpus: float = Field(
        default=0.0, ge=0,
        description="GPUs for this engine; 0 runs vLLM's CPU build. With tensor or pipeline parallelism, the GPUs of "
        "one engine come from a placement group and this is the share of the first one; on CPUs the workers split "
        "the replica's cores (raise `num_cpus` to what they use).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources this engine needs (added to the gateway replica's), which only the nodes "
        "started with them offer (`ray start --resources '{\"big_mem\": 1}'`): puts a model on chosen nodes of "
        "a cluster, as num_gpus does on GPU nodes.",
    )
    max_queued_requests: int = Field(
        default=1024, ge=-1,
        description="Requests the gateway lets wait for a vLLM engine beyond `max_num_seqs` before it answers 503 "
        "with Retry-After; lower it to shed load sooner, -1 never refuses.",
    )
    variants: list[str] = Field(
        default_factory=lambda: ["full"],
        description="Weight variants in order of preference ('full', 'int8-w8a8', 'bnb-8bit', 'bnb-nf4', or the groups "
        "'int8' and '4bit'); the first the version has and this hardware runs is served.",
    )
    follow: bool = Field(
        default=True,
        description="When `model` names an alias (`name@stable`, or a bare name for `latest`), follow it: a promotion "
        "or rollback starts the new version beside the old, switches traffic, then drains the old one.",
    )
    registry_poll_s: float = Field(default=2.0, gt=0, description="How often a followed alias (and adapters) are checked; shorter rolls out sooner for more registry reads.")
    drain_timeout_s: float = Field(
        default=300.0, ge=0, description="Longest an old version keeps serving its in-flight requests after a switch; keep it "
        "above your longest generation."
    )
    lora: bool = Field(
        default=False,
        description="Serve the LoRA adapters published for the served version as their own model ids, loaded into "
        "the running engine as they appear (vLLM engines, placement `gateway`). Turns on vLLM's `enable_lora`; "
        "size the adapter slots with `max_loras` and `max_lora_rank` in engine_kwargs.",
    )
    placement: Literal["gateway", "deployment"] = Field(
        default="gateway",
        description="`gateway`: the engine runs inside every gateway replica (no Ray hop per response: the fastest). "
        "`deployment`: a Serve deployment of its own, named `<model>@<version>` in the dashboard, with its own "
        "replicas and autoscaling; the gateway reaches it through a handle, streams coalesced per message.",
    )
    num_replicas: int = Field(default=1, ge=1, description="Replicas of a `deployment` placement (without autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Scale a `deployment` placement's replicas with its load instead of num_replicas."
    )
    max_ongoing_requests: int = Field(
        default=1024, ge=1, description="Requests in flight per replica of a `deployment` placement (Serve's limit)."
    )
    routing: Literal["conversation", "prefix_tree", "load"] = Field(
        default="conversation",
        description="How the gateway picks among a `deployment` placement's replicas. `conversation`: each "
        "conversation (`prompt_cache_key`, or the messages up to the first user turn) sticks to one replica, so "
        "vLLM's prefix cache there holds its history and later turns skip its prefill; a replica carrying "
        "`gateway.conversation_routing.max_load_gap` more requests than the least busy, or whose KV cache is "
        "`max_kv_cache_usage` full, is passed over. Stateless: nothing is asked per request. `prefix_tree`: Ray "
        "Serve LLM's prefix-aware router, which remembers the prompts it sent to each replica in a tree (one actor "
        "per deployment), sends a request to the replica holding the longest match and a new conversation to the "
        "replica holding the least; choose it when conversations are many per replica and caches hold only part "
        "of them (hashing gives some replicas more than their share), at the cost of two calls to that actor per "
        "request. `load`: Serve's default router (the less busy of two random replicas), for traffic with no "
        "shared prefixes.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelDeploymentConfig:
        for name in self.engine_kwargs:
            if name in RESERVED_VLLM_ARGS:
                raise ValueError(f"engine_kwargs.{name}: raygate sets it (use `model` and `served_name`)")
            if not name.isidentifier():
                raise ValueError(f"engine_kwargs.{name}: vLLM's argument names in snake_case, as `max_model_len`")
        if (self.engine == "openai") != (self.upstream is not None):
            raise ValueError("engine `openai` needs `upstream` (and only it takes one)")
        if not self.variants:
            raise ValueError("variants needs at least one name")
        if self.placement == "deployment" and self.lora:
            raise ValueError("LoRA adapters are served with placement `gateway` only")
        if self.placement == "gateway" and (self.autoscaling is not None or self.num_replicas != 1):
            raise ValueError("num_replicas and autoscaling of a model need placement `deployment` "
                             "(co-located engines scale with gateway.autoscaling)")
        return self

    @property
    def hardware(self) -> Literal["cpu", "gpu"]:
        return "gpu" if self.num_gpus > 0 else "cpu"

    def vllm_args(self) -> dict[str, Any]:
        """vLLM's arguments for this engine: raygate's defaults, with engine_kwargs over them."""
        defaults = VLLM_DEFAULTS if self.hardware == "gpu" else {**VLLM_DEFAULTS, **CPU_VLLM_DEFAULTS}
        return {**defaults, **({"enable_lora": True} if self.lora else {}), **self.engine_kwargs}

    @property
    def workers_per_engine(self) -> int:
        """vLLM workers of one engine (tensor x pipeline parallel)."""
        args = self.vllm_args()
        return int(args.get("tensor_parallel_size") or 1) * int(args.get("pipeline_parallel_size") or 1)

    @property
    def gpus_per_engine(self) -> int:
        """GPUs one engine spans: a GPU per worker (vLLM's Ray executor, in the replica's placement group). On
        CPUs, none: vLLM's CPU build starts its workers as processes of the engine, on the replica's node, each
        on its own share of the cores (`serve.hardware.cpu_worker_binding`)."""
        return self.workers_per_engine if self.hardware == "gpu" else 0


class ServeConfig(BaseModel):
    """The models a Serve application runs, plus where their artifacts live."""

    model_config = ConfigDict(extra="forbid")

    registry: str | None = Field(default=None, description="Registry root (directory or fsspec URL); default $RAYGATE_HOME/registry.")
    models: list[ModelDeploymentConfig] = Field(min_length=1, description="Model deployments.")

    @model_validator(mode="after")
    def _unique(self) -> ServeConfig:
        names = [m.served_name for m in self.models if m.served_name]
        if len(names) != len(set(names)):
            raise ValueError("served_name values must be unique")
        return self

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | ServeConfig) -> ServeConfig:
        """Accept a YAML path, a dict or an object."""
        if isinstance(source, ServeConfig):
            return source
        if isinstance(source, dict):
            return cls.model_validate(source)
        data = yaml.safe_load(Path(source).read_text())
        return cls.model_validate(data.get("serve", data) if isinstance(data, dict) else data)
