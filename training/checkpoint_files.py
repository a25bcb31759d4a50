"""Hugging Face checkpoint directories: copying the non-weight files, loading for training or eval."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# Everything a checkpoint needs beside its weights and config.json (which quantizers rewrite).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
)


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    """Copy tokenizer, chat template and generation config from `src` to `dst` (where present)."""
    for name in SIDE_FILES:
        p = Path(src) / name
        if p.exists():
            shutil.copy2(p, Path(dst) / name)


def pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def torch_device(use_gpu: bool) -> Any:
    import torch

    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
