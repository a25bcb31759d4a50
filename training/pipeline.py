"""The whole job: data -> Ray Train -> held-out gate -> merge / quantize -> atomic publish.

Evaluation and quantization run as Ray tasks with the job's resources (a GPU per task when
`use_gpu`), so a cluster runs them where the weights fit; the driver only orchestrates.
Nothing reaches the registry unless the gate passes, and a publish is all or nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from models.manifest import Manifest, Variant
from models.registry import Registry
from training.config import TrainConfig
from training.dataset import DatasetError, load_jsonl, split, tokenize, write_demo_dataset
from training.gate import GateDecision, decide

Log = Callable[[str], None]


class PipelineResult(BaseModel):
    """What a job did: the gate, the published version (if any), metrics and step timings."""

    published: Manifest | None = Field(default=None, description="The new version; None when the gate refused it.")
    gate: GateDecision = Field(description="Held-out loss gate.")
    train_metrics: dict[str, Any] = Field(default_factory=dict, description="Last metrics reported by rank 0.")
    variant_eval: dict[str, dict[str, float]] = Field(default_factory=dict, description="Held-out loss per variant.")
    timings_s: dict[str, float] = Field(default_factory=dict, description="Wall time of each step and in total.")


def run_pipeline(cfg: TrainConfig, registry: Registry, home: Path, log: Log = print) -> PipelineResult:
    """Run the job end to end (Ray is started or joined as needed)."""
    import ray

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    clock = _clock(timings)
    base = registry.resolve(cfg.base_model)
    base_path = str(registry.local_path(base))
    log(f"[pipeline] base {base.ref} ({cfg.method}, {cfg.num_workers} workers, {cfg.max_steps} steps)")

    with clock("data"):
        train_ex, held_ex, pad, data_desc = prepare_data(cfg, base_path, home)
    log(f"[pipeline] data: {len(train_ex)} training / {len(held_ex)} held-out examples ({data_desc})")

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    task = _task_options(cfg)

    from training.evaluate import evaluate_checkpoint

    evaluate = ray.remote(evaluate_checkpoint).options(**task)
    held_ref = ray.put(held_ex)
    with clock("eval_base"):
        base_eval = ray.get(evaluate.remote(base_path, held_ref, pad))
    log(f"[pipeline] base held-out loss {base_eval['loss']:.4f} (perplexity {base_eval['perplexity']:.1f})")

    with clock("train"):
        checkpoint_dir, train_metrics = train(cfg, base_path, train_ex, pad, home)
    log(f"[pipeline] trained: {train_metrics}")

    work = Path(tempfile.mkdtemp(prefix="candidate-", dir=_train_root(cfg, home)))
    try:
        final = checkpoint_dir / "final"
        adapter = cfg.method == "lora" and cfg.publish_adapter
        with clock("merge"):
            candidate = _candidate(cfg, base_path, final, work)
        with clock("eval_candidate"):
            args = (base_path, held_ref, pad, str(candidate)) if adapter else (str(candidate), held_ref, pad)
            cand_eval = ray.get(evaluate.remote(*args))
        gate = decide(base_eval["loss"], cand_eval["loss"], cfg.gate.max_regression, cfg.gate.enabled)
        log(f"[pipeline] gate: {gate.reason}")
        if not gate.passed:
            timings["total"] = time.perf_counter() - t_all
            return PipelineResult(gate=gate, train_metrics=train_metrics, timings_s=timings)

        variants: list[Variant] = []
        variant_eval: dict[str, dict[str, float]] = {"full": cand_eval}
        if not adapter:
            from training.quantize import quantize, variant

            variants.append(variant("full", ""))
            quant = ray.remote(quantize).options(**task)
            with clock("quantize"):
                ray.get([quant.remote(str(candidate), str(candidate / "variants" / k), k) for k in cfg.quantize])
            variants += [variant(k, f"variants/{k}") for k in cfg.quantize]
            if cfg.eval_variants and cfg.quantize:
                with clock("eval_variants"):
                    results = ray.get([evaluate.remote(str(candidate / "variants" / k), held_ref, pad) for k in cfg.quantize])
                variant_eval.update(dict(zip(cfg.quantize, results)))
            variants = [v.model_copy(update={"metrics": variant_eval.get(v.name, {})}) for v in variants]
            log("[pipeline] variants: " + ", ".join(
                f"{k} loss {e['loss']:.4f}" for k, e in variant_eval.items()))

        with clock("publish"):
            manifest = registry.publish(
                cfg.output_name or (f"{base.name}-lora" if adapter else base.name),
                candidate,
                format="lora" if adapter else "hf",
                base_model=base.ref,
                metrics={
                    "eval_loss": cand_eval["loss"], "eval_perplexity": cand_eval["perplexity"],
                    "base_eval_loss": base_eval["loss"], "train_loss": float(train_metrics.get("loss", float("nan"))),
                },
                metadata={
                    "source": "training.pipeline",
                    "training": {
                        "method": cfg.method, "steps": cfg.max_steps, "num_workers": cfg.num_workers,
                        "use_gpu": cfg.use_gpu, "dataset": data_desc, "train_examples": len(train_ex),
                        "heldout_examples": len(held_ex), "resumed_from_step": train_metrics.get("resumed_from", 0),
                        "checkpoint": str(checkpoint_dir),
                    },
                    "eval": {"base": base_eval, "candidate": cand_eval, "gate": gate.model_dump(), "variants": variant_eval},
                },
                aliases=cfg.aliases,
                variants=variants,
            )
        timings["total"] = time.perf_counter() - t_all
        log(f"[pipeline] published {manifest.ref} in {timings['total']:.1f}s")
        return PipelineResult(published=manifest, gate=gate, train_metrics=train_metrics, variant_eval=variant_eval,
                              timings_s=timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _clock(timings: dict[str, float]) -> Callable[[str], AbstractContextManager[None]]:
    """`with clock("step"):` records the step's wall time in `timings`."""

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = round(time.perf_counter() - t0, 2)

    return timed


def _task_options(cfg: TrainConfig) -> dict[str, Any]:
    return {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if cfg.use_gpu else 0, "max_retries": 1}


def _train_root(cfg: TrainConfig, home: Path) -> Path:
    root = Path(cfg.storage_path).expanduser() if cfg.storage_path else home / "train"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def prepare_data(cfg: TrainConfig, base_path: str, home: Path) -> tuple[list[Any], list[Any], int, str]:
    """(training examples, held-out examples, pad id, description), tokenized with the base's chat template."""
    from transformers import AutoTokenizer

    from training.checkpoint_files import pad_id

    if cfg.dataset.path:
        path, desc = Path(cfg.dataset.path).expanduser(), cfg.dataset.path
    else:
        path = home / "datasets" / "demo-chat.jsonl"
        if not path.exists():
            write_demo_dataset(path)
        desc = f"demo ({path})"
    conversations = load_jsonl(path)
    if cfg.dataset.eval_path:
        train, held = conversations, load_jsonl(Path(cfg.dataset.eval_path).expanduser())
    else:
        train, held = split(conversations, cfg.dataset.eval_fraction)
    tok = AutoTokenizer.from_pretrained(base_path)
    if getattr(tok, "chat_template", None) is None:
        raise DatasetError(f"{base_path} has no chat template: chat examples cannot be rendered")
    train_ex = [t for c in train if (t := tokenize(tok, c, cfg.dataset.max_seq_len))]
    held_ex = [t for c in held if (t := tokenize(tok, c, cfg.dataset.max_seq_len))]
    if not train_ex or not held_ex:
        raise DatasetError("no example leaves an assistant token within max_seq_len")
    return train_ex, held_ex, pad_id(tok), desc


def train(cfg: TrainConfig, base_path: str, examples: list[Any], pad: int, home: Path) -> tuple[Path, dict[str, Any]]:
    """Run the Ray Train job; (the last checkpoint's directory, rank 0's last metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.loop import train_loop_per_worker

    name = cfg.run_name or f"train-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "base_path": base_path, "examples": examples,
                           "pad_id": pad},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(_train_root(cfg, home)),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} ended without a checkpoint")
    return Path(result.checkpoint.path), dict(result.metrics or {})


def _candidate(cfg: TrainConfig, base_path: str, final: Path, work: Path) -> Path:
    """The directory to publish: the merged model, the full model, or the adapter."""
    out = work / "model"
    if cfg.method == "lora" and not cfg.publish_adapter:
        from training.quantize import merge_lora

        return merge_lora(base_path, final, out)
    shutil.copytree(final, out)
    return out
