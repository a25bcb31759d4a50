"""Typed configuration of model deployments (YAML, dict or object)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    start_s: float = Field(default=0.0, ge=0, description="How long the engine takes to start (a real one: 20-60 s).")
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


class LoraConfig(BaseModel):
    """vLLM's LoRA support: adapters published for the served version load at run time as their own model ids."""

    model_config = ConfigDict(extra="forbid")

    max_loras: int = Field(default=4, ge=1, description="Adapters vLLM keeps loaded at once (per batch).")
    max_lora_rank: int = Field(default=16, ge=1, description="Largest adapter rank accepted (8, 16, 32, 64...).")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="Adapters cached in host memory; None: max_loras.")


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
        default_factory=dict, description="Extra vLLM engine arguments (as on vLLM's command line, snake_case)."
    )
    fake: FakeEngineConfig = Field(default_factory=FakeEngineConfig, description="Fake engine knobs.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length; None takes the model's.")
    kv_cache_gib: int = Field(default=1, ge=1, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica splitting each layer.")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages per replica.")
    num_cpus: float = Field(default=0.5, ge=0, description="CPUs Ray reserves for this engine (added to the gateway replica's).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs for this engine (0 on CPU machines).")
    max_queued_requests: int = Field(
        default=1024, ge=-1, description="Requests admitted beyond max_num_seqs before the engine answers 503; -1: no cap."
    )
    max_num_seqs: int = Field(default=256, ge=1, description="Sequences vLLM batches at once.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="priority", description="vLLM scheduling: `priority` lets key tiers order requests (lower first)."
    )
    cpu_affinity: list[int] | None = Field(
        default=None,
        description="CPU cores for the engine's processes (the worker's under `mp`, the engine core's under `uni`); "
        "None keeps vLLM's default binding.",
    )
    cpu_executor: Literal["mp", "uni"] = Field(
        default="mp",
        description="CPU engines: where vLLM runs the model. `mp` (vLLM's CPU default): a worker process of its own, "
        "OpenMP-bound to all cores but one, handing each step to the engine-core process over a shared-memory "
        "queue the engine core spins on. `uni`: in the engine-core process itself (vLLM's UniProcExecutor), one "
        "compute thread, no hop and no spin. On 2 cores `uni` gave 1.10x / 1.19x the output tok/s of `mp` at "
        "16 / 64 streams, but TTFT p50 1.47x / 1.23x of `mp`'s (vLLM's own server gained 1.24x / 1.33x tok/s and "
        "a faster first token from it), benchmarks/results/cpu_executor: an opt-in for throughput where the worker "
        "would get one core anyway (2 cores or fewer); with more, `mp` computes on more threads.",
    )
    engine_nice: int = Field(
        default=0, ge=-19, le=19,
        description="CPU engines only: how many nice levels below its replica vLLM's engine-core and worker processes "
        "run. Above 0 the replica's event loop (requests in, tokens out) and HAProxy run as soon as they wake "
        "instead of queueing behind the engine: a faster first token under load, fewer tokens per second "
        "(4 gave TTFT p50 1.10x / 1.08x of vLLM's server but 0.83x / 0.73x its tok/s at 16 / 64 streams, "
        "benchmarks/results/vllm). Below 0 the engine runs ahead of its replica (this needs CAP_SYS_NICE; without "
        "it the engine keeps the replica's level, with a warning): -5 with `engine_spin_s: 0` gave 0.99x / 0.97x "
        "the tok/s of vLLM's server but TTFT p50 1.22x / 1.21x (benchmarks/results/engine_first). 0: the "
        "replica's level.",
    )
    engine_spin_s: float | None = Field(
        default=None, ge=0,
        description="`mp` CPU executor only: seconds vLLM's engine-core and worker processes keep spinning on their "
        "shared-memory queues "
        "after each message before they sleep on its notification (serve/vllm_plugin.py). None: vLLM's own 1 s. "
        "0 frees the core the engine core spins on (CPU 134-140% instead of 186% of 2 cores here) at a cost in "
        "latency at low load: 0.98x / 1.04x the tok/s of spinning and TTFT p50 1.46x / 1.11x of vLLM's server "
        "instead of 1.12x / 1.06x at 16 / 64 streams (benchmarks/results/spin).",
    )
    engine_metrics_flush_s: float = Field(
        default=1.0, ge=0,
        description="vLLM engines inside Ray: the longest a gauge or counter of vLLM's engine metrics (recorded every "
        "engine step) waits before it reaches Ray's metrics export, which sends every few seconds anyway "
        "(serve/engine_metrics.py). Gauges keep their last value, counters their sum; histograms go at once. "
        "0: every value at once, as vLLM does (about fifteen Ray metric calls per step on the replica's event loop).",
    )
    stream_interval: int = Field(
        default=1, ge=1,
        description="vLLM engines: tokens per streamed event after the first, which goes at once (vLLM's "
        "`stream_interval`). 1 streams every token, as vLLM's server does. More cuts the front end's work per token "
        "(one engine output, one chunk, one SSE write per event instead of per token): at 4 on a 2-core CPU host, "
        "1.13x / 1.18x the output tok/s of vLLM's server streaming every token at 16 / 64 streams with TTFT p50 "
        "1.01x / 0.98x, where every token gave 0.83x / 0.92x and 1.47x / 1.31x; a second run held the tok/s "
        "(1.15x / 1.02x at 4, 1.20x / 1.09x at 2) but not TTFT p50 at 64 streams (1.37x / 1.23x) "
        "(benchmarks/results/stream_interval). Clients get N tokens per event (at 4 about 30 ms of output at 16 "
        "streams, 75 ms at 64).",
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
    registry_poll_s: float = Field(default=2.0, gt=0, description="How often a followed alias (and adapters) are checked.")
    drain_timeout_s: float = Field(
        default=300.0, ge=0, description="Longest an old version keeps serving its in-flight requests after a switch."
    )
    lora: LoraConfig | None = Field(
        default=None, description="Enable LoRA adapters (vLLM only): published adapters of the served version load live."
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
    stream_coalesce_ms: float = Field(
        default=25.0, ge=0,
        description="A `deployment` placement sends a stream's first event at once, then what the engine made within "
        "this window as one Ray message (one message per token costs throughput; 0: one per event).",
    )

    @model_validator(mode="after")
    def _parallel(self) -> ModelDeploymentConfig:
        gpus_needed = self.tensor_parallel_size * self.pipeline_parallel_size
        if gpus_needed > 1 and self.num_gpus == 0:
            raise ValueError("tensor/pipeline parallelism needs num_gpus > 0 (GPU workers in a placement group)")
        if (self.engine == "openai") != (self.upstream is not None):
            raise ValueError("engine `openai` needs `upstream` (and only it takes one)")
        if not self.variants:
            raise ValueError("variants needs at least one name")
        if self.placement == "deployment" and self.lora is not None:
            raise ValueError("LoRA adapters are served with placement `gateway` only")
        if self.placement == "gateway" and (self.autoscaling is not None or self.num_replicas != 1):
            raise ValueError("num_replicas and autoscaling of a model need placement `deployment` "
                             "(co-located engines scale with gateway.autoscaling)")
        return self

    @property
    def hardware(self) -> Literal["cpu", "gpu"]:
        return "gpu" if self.num_gpus > 0 else "cpu"


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
