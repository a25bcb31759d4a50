"""The training loop each Ray Train worker runs (DDP), and the model/optimizer pieces it is made of.

`train_loop_per_worker` resumes from `ray.train.get_checkpoint()` after a worker-group
restart, reports metrics every `log_every` steps and a checkpoint every `checkpoint_every`
steps (rank 0 writes it; every rank reports, as Ray Train requires). The last checkpoint
also holds `final/`: the trained model (full) or adapter (LoRA) as a Hugging Face directory.
The pieces below it (`build_model`, `lr_factor`, `batches`) need no Ray and run alone on a GPU.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from training.checkpoint_files import copy_side_files, torch_device
from training.config import TrainConfig
from training.dataset import collate

STATE_FILE = "trainer_state.pt"
FINAL_DIR = "final"


def build_model(base_path: str, cfg: TrainConfig, device: Any) -> Any:
    """The base model in float32, wrapped with a LoRA adapter for method `lora`."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
        ))
    return model.to(device)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then linear decay to 0.1 at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    return max(0.1, 1.0 - 0.9 * (step - cfg.warmup_steps) / span)


def batches(n_examples: int, cfg: TrainConfig, rank: int, world: int, step: int) -> list[int]:
    """Example indices of this rank's batch at `step`: a seeded shuffle per epoch, split across ranks."""
    per_step = cfg.batch_size * world
    per_epoch = max(n_examples // per_step, 1)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(cfg.seed * 100_003 + epoch).shuffle(order)
    start = offset * per_step + rank * cfg.batch_size
    return [order[(start + i) % n_examples] for i in range(cfg.batch_size)]


def trainable(model: Any) -> dict[str, Any]:
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` holds the job config, the base path and the tokenized examples."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.model_validate(config["train"])
    examples: list[tuple[list[int], list[int]]] = config["examples"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch_device(False)
    model = build_model(config["base_path"], cfg, device)
    params = list(trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        missing = model.load_state_dict(state["model"], strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    resumed_from = start
    ddp = ray.train.torch.prepare_model(model, parallel_strategy="ddp") if world > 1 else model
    pad = int(config["pad_id"])
    loss_acc, n_acc, tokens, t0 = 0.0, 0, 0, time.perf_counter()
    for step in range(start, cfg.max_steps):
        ddp.train()
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        batch = collate([examples[i] for i in batches(len(examples), cfg, rank, world, step)], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = ddp(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_acc += float(loss.detach())
        n_acc += 1
        tokens += int(batch["attention_mask"].sum())
        done = step + 1
        last = done == cfg.max_steps
        if done % cfg.log_every and done % cfg.checkpoint_every and not last:
            continue
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": done, "loss": loss_acc / n_acc,
            "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tokens * world / max(elapsed, 1e-9),
            "resumed_from": resumed_from,
        }
        loss_acc, n_acc, tokens, t0 = 0.0, 0, 0, time.perf_counter()
        if done % cfg.checkpoint_every == 0 or last:
            _report_with_checkpoint(model, optimizer, done, metrics, rank, config["base_path"], cfg, last)
        else:
            ray.train.report(metrics)
        if rank == 0:
            print(f"[train] step {done}/{cfg.max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                  f"{metrics['tokens_per_s']:.0f} tok/s", flush=True)


def _report_with_checkpoint(
    model: Any, optimizer: Any, step: int, metrics: dict[str, Any], rank: int, base_path: str, cfg: TrainConfig,
    final: bool,
) -> None:
    import ray.train
    import torch

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raygate-ckpt-") as tmp:
        state = {"model": {k: v.detach().cpu() for k, v in trainable(model).items()},
                 "optimizer": optimizer.state_dict(), "step": step}
        torch.save(state, os.path.join(tmp, STATE_FILE))
        if final:
            out = Path(tmp) / FINAL_DIR
            if cfg.method == "full":  # saved in the base's dtype (training ran in float32); training is over
                from transformers import AutoConfig

                model.to(getattr(AutoConfig.from_pretrained(base_path), "dtype", None) or torch.float32)
            model.save_pretrained(out, safe_serialization=True)  # the adapter (LoRA) or the whole model
            if cfg.method == "full":
                copy_side_files(base_path, out)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
