"""Scenario files: targets to start (or reach), workloads, load levels, SLO and goals, in YAML.

Strings in a target's `start`, `env`, `files`, `base_url` and `key` may use placeholders:
`{python}` (this interpreter), `{bin}` (its directory), `{workdir}` (the run's scratch
directory), `{port}` (a free port given to this target), `{ports[NAME]}` (another
target's port), `{key}` (an API key made for the run), `{env[VAR]}` (the environment)
and `{repo}` (the repository root, for files such as `.bench/` venvs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from benchmarks.workload import Workload


class Target(BaseModel):
    """One server under test: started by the run (`start`) or already running (`base_url` only)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Label in reports.")
    base_url: str = Field(default="http://127.0.0.1:{port}/v1", description="OpenAI base URL (with /v1).")
    model: str = Field(description="Model id sent in requests.")
    key: str | None = Field(default=None, description="API key (Bearer); None sends none.")
    start: list[str] | None = Field(default=None, description="Command that runs the server in the foreground.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of `start`.")
    files: dict[str, str] = Field(default_factory=dict, description="Files written under {workdir} before `start`.")
    ready_path: str | None = Field(
        default="/health", description="Path on the origin that answers 200 once it is ready; None: no check."
    )
    ready_timeout_s: float = Field(default=120.0, gt=0, description="Longest wait for readiness.")
    measure: bool = Field(default=True, description="False for helpers (an upstream other targets front).")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer (a directory) vLLM's benchmark client draws and counts prompts with "
        "(`load.client: vllm`); None: the model id, as a Hugging Face repository.",
    )
    requires: str | None = Field(
        default=None, description="Executable the target needs (placeholders allowed); missing -> the target is skipped "
        "with the reason in the report, e.g. a peer installed by `make bench-peers`.",
    )


class LoadConfig(BaseModel):
    """The load levels every target is measured at."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["closed", "open"] = Field(default="closed", description="closed: concurrency sweep; open: Poisson rates.")
    client: Literal["raygate", "vllm"] = Field(
        default="raygate",
        description="Who measures each point. `raygate`: this load generator. `vllm`: vLLM's own benchmark client "
        "(`vllm.benchmarks.serve`, random prompts of the workload's fixed lengths, every stream started "
        "together, `level` warm-up requests then 8 per stream measured), the field's yardstick "
        "when raygate is compared with vLLM's server. Closed loop only.",
    )
    levels: list[float] = Field(min_length=1, description="Concurrencies (closed) or request rates in req/s (open).")
    duration_s: float = Field(default=15.0, gt=0, description="Measured seconds per point.")
    warmup_s: float = Field(
        default=2.0, ge=0, description="Unmeasured seconds before each point. A closed loop runs straight on from "
        "its warm-up into the measured seconds (streams keep their phases).",
    )
    ramp_s: float = Field(
        default=0.0, ge=0, description="Closed loop: the workers' first requests spread evenly over this many "
        "seconds instead of all at once. Fixed-length streams started together stay in step (they finish in one "
        "engine step and arrive again together); a ramp about one request long spreads them as independent "
        "clients are. Keep it within `warmup_s` to measure only the spread state.",
    )
    target_warmup_s: float = Field(
        default=0.0, ge=0, description="Unmeasured seconds at the highest level once a target is ready (compiles, "
        "caches and connection pools warm before the first point).",
    )
    rounds: int = Field(
        default=1, ge=1, description="Times every point is measured, the targets interleaved within each round (in "
        "a rotated order) so that drift of the machine hits all of them alike; a point reports its median round.",
    )
    cycles: int = Field(
        default=1, ge=1, description="Sequential lifecycle: times the whole sequence of targets is started, measured "
        "and stopped, in a rotated order each cycle, so that the machine's drift over minutes hits every target "
        "alike; a point reports its median cycle, and ratios are the median of the cycle-by-cycle ratios.",
    )
    together: bool = Field(
        default=False, description="Measure the targets of a round at the same time, each with its own clients at "
        "the level: bursts and drift of the machine then hit them alike at every instant. Where targets are "
        "CPU-bound and share the cores, their req/s ratio is the inverse ratio of their CPU cost per request.",
    )
    max_requests: int = Field(default=1_000_000, ge=1, description="Cap on requests per point.")
    max_inflight: int = Field(default=2048, ge=1, description="Open loop: outstanding requests before arrivals count as errors.")
    timeout_s: float = Field(default=300.0, gt=0, description="Per-request client timeout.")


class Goal(BaseModel):
    """A target figure, checked on every matching point: `metric` of `target` compared with `vs`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="What the goal says, in words.")
    target: str = Field(description="Target whose figure is checked.")
    vs: str | None = Field(default=None, description="Target it is compared with (None: absolute).")
    metric: Literal["req_per_s", "req_per_cpu_s", "output_tok_per_s", "goodput_req_per_s", "e2e_p50_ms",
                    "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "clumped_share",
                    "frontend_cpu_s_per_1k_tokens"] = Field(
        description="req_per_cpu_s: requests per CPU-second of the target's own processes (its cost per request, "
        "inverted; measured with `load.together`). clumped_share: the share of stream chunks that arrived within "
        "0.5 ms of the one before, and frontend_cpu_s_per_1k_tokens: CPU-seconds of every process of the target but "
        "vLLM's engine core and workers per 1,000 output tokens (both measured with `load.client: vllm`).",
    )
    compare: Literal["ratio", "delta", "value"] = Field(default="ratio", description="target/vs, target-vs, or target.")
    workloads: list[str] | None = Field(default=None, description="Workloads it applies to (None: all).")
    levels: list[float] | None = Field(default=None, description="Load levels it applies to (None: all).")
    min: float | None = Field(default=None, description="Lowest acceptable figure.")
    max: float | None = Field(default=None, description="Highest acceptable figure.")


class Scenario(BaseModel):
    """Targets side by side, interleaved point by point so all face the same background load."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Directory name under the results root.")
    description: str = Field(default="", description="What it measures.")
    targets: list[Target] = Field(min_length=1, description="Servers, started in this order, stopped in reverse.")
    baseline: str | None = Field(default=None, description="Target the ratio table divides by.")
    workloads: list[Workload] = Field(default_factory=lambda: [Workload()], description="Request shapes.")
    load: LoadConfig = Field(description="Load levels.")
    slo: str = Field(default="", description="Goodput SLO, e.g. `ttft=0.5,tpot=0.05` (seconds).")
    lifecycle: Literal["together", "sequential"] = Field(
        default="together",
        description="together: all targets up, interleaved per point; sequential: one target up at a time "
        "(for targets that cannot share the machine's fixed ports).",
    )
    goals: list[Goal] = Field(default_factory=list, description="Target figures checked after the run.")

    @model_validator(mode="after")
    def _names(self) -> Scenario:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("target names must be unique")
        for ref in [self.baseline] + [g.target for g in self.goals] + [g.vs for g in self.goals]:
            if ref is not None and ref not in names:
                raise ValueError(f"unknown target {ref!r}")
        if self.load.cycles > 1 and (self.lifecycle != "sequential" or self.load.rounds > 1):
            raise ValueError("load.cycles needs lifecycle: sequential and load.rounds: 1")
        if self.load.client == "vllm":
            if self.load.mode != "closed" or self.load.together:
                raise ValueError("load.client vllm measures a closed loop (vLLM's --max-concurrency), one target at "
                                 "a time")
            if any(w.dataset is not None or w.prompt_tokens.fixed is None or w.output_tokens.fixed is None
                   for w in self.workloads):
                raise ValueError("load.client vllm draws random prompts of fixed lengths: no dataset, no ranges")
        if len({w.name for w in self.workloads}) != len(self.workloads):
            raise ValueError("workload names must be unique")
        return self

    @classmethod
    def load_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
        data = yaml.safe_load(Path(path).read_text())
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.model_validate(data)


class Placeholders(dict[str, Any]):
    """The values `{...}` placeholders expand to (see the module docstring)."""

    @classmethod
    def create(cls, python: str, workdir: Path, repo: Path, ports: dict[str, int], key: str) -> Placeholders:
        return cls(python=python, bin=str(Path(python).parent), workdir=str(workdir), repo=str(repo),
                   ports=ports, key=key, env=dict(os.environ))

    def expand(self, text: str, target: str) -> str:
        return text.format_map({**self, "port": self["ports"][target]})
