"""Held-out loss and perplexity of a checkpoint on tokenized chat examples (assistant tokens only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from training.dataset import collate


def loss_of(model: Any, examples: list[tuple[list[int], list[int]]], pad: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per learned token (the same tokens training learns)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total += float(losses)
            count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def evaluate_checkpoint(
    model_dir: str | Path, examples: list[tuple[list[int], list[int]]], pad: int, adapter_dir: str | None = None
) -> dict[str, float]:
    """{'loss', 'perplexity'} of the checkpoint in `model_dir` (any variant transformers loads), plus an adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    loss = loss_of(model, examples, pad)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
