"""Typed configuration of a fine-tuning job (`raygate train CONFIG.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

QuantFormat = Literal["int8-w8a8", "bnb-8bit", "bnb-nf4"]


class LoraSettings(BaseModel):
    """LoRA (PEFT) adapter shape."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, ge=1, description="Adapter rank (vLLM serves ranks up to its max_lora_rank).")
    alpha: int = Field(default=16, ge=1, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get an adapter (names as in the checkpoint).",
    )


class DatasetConfig(BaseModel):
    """Where the chat examples come from."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, description="Chat JSONL (OpenAI `messages`); None: the demo set raygate writes.")
    eval_path: str | None = Field(default=None, description="Held-out JSONL; None: split `eval_fraction` off `path`.")
    eval_fraction: float = Field(default=0.1, gt=0, lt=1, description="Share held out for the gate when no eval_path.")
    max_seq_len: int = Field(default=256, ge=16, description="Tokens per example (longer ones are cut).")


class GateConfig(BaseModel):
    """Publish only a model that is not worse than the one it started from."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Off: publish whatever the run produced (not recommended).")
    max_regression: float = Field(
        default=0.0, ge=0, description="Largest relative increase of held-out loss over the base accepted (0.02 = 2%)."
    )


class TrainConfig(BaseModel):
    """A fine-tuning job: base model, data, Ray Train scale, gate, quantized variants, publication."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default="raygate/tiny-chat@stable", description="Registry reference of the model to tune.")
    output_name: str | None = Field(
        default=None, description="Registry name of the result; None: the base's name (merged) or `<base>-lora` (adapter)."
    )
    method: Literal["full", "lora"] = Field(default="lora", description="Full fine-tune or a LoRA adapter.")
    publish_adapter: bool = Field(
        default=False, description="LoRA only: publish the adapter itself (served live by vLLM) instead of merging it."
    )
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Training and held-out data.")
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(default=False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per worker.")
    max_steps: int = Field(default=120, ge=1, description="Optimizer steps in total.")
    batch_size: int = Field(default=16, ge=1, description="Examples per worker per step.")
    learning_rate: float = Field(default=2e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warm-up, then linear decay to 10%.")
    seed: int = Field(default=0, description="Seed of initialisation and data order.")
    checkpoint_every: int = Field(default=20, ge=1, description="Steps between checkpoints (reported through ray.train).")
    log_every: int = Field(default=5, ge=1, description="Steps between progress lines and reported metrics.")
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts from the last checkpoint before giving up.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape (method lora).")
    gate: GateConfig = Field(default_factory=GateConfig, description="Held-out loss gate.")
    quantize: list[QuantFormat] = Field(
        default_factory=lambda: list(get_args(QuantFormat)),
        description="Quantized variants published beside the full-precision weights.",
    )
    eval_variants: bool = Field(default=True, description="Measure held-out loss of every quantized variant too.")
    aliases: list[str] = Field(
        default_factory=list, description="Aliases set at publish (e.g. ['canary']); promotion is a separate step."
    )
    registry: str | None = Field(default=None, description="Registry root; None: $RAYGATE_HOME/registry.")
    storage_path: str | None = Field(default=None, description="Ray Train run storage; None: $RAYGATE_HOME/train.")
    run_name: str | None = Field(default=None, description="Ray Train run name; None: derived from the time.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.publish_adapter and self.method != "lora":
            raise ValueError("publish_adapter needs method: lora")
        if self.publish_adapter and self.quantize:
            raise ValueError("an adapter is published as is: set quantize: [] with publish_adapter")
        return self

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | TrainConfig) -> TrainConfig:
        if isinstance(source, TrainConfig):
            return source
        if isinstance(source, dict):
            return cls.model_validate(source)
        return cls.model_validate(yaml.safe_load(Path(source).read_text()) or {})
