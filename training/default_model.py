"""Build raygate's small default model locally, with no download.

A byte-level BPE tokenizer is trained on local text (the Python standard library's
sources), and a small Llama-architecture checkpoint is initialised from a fixed seed
and saved as safetensors with a ChatML chat template. Every layer width is a multiple
of 32 so that bitsandbytes and int8 kernels accept it. The result is an ordinary
Hugging Face checkpoint directory: the same code path serves a user's own checkpoint.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

DEFAULT_MODEL_NAME = "raygate/tiny-chat"
DEFAULT_EMBEDDING_MODEL_NAME = "raygate/tiny-embed"

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TinyModelConfig(BaseModel):
    """Shape of the default model; every width a multiple of 32."""

    vocab_size: int = Field(default=8192, description="Tokenizer vocabulary size, special tokens included.")
    hidden_size: int = Field(default=256, description="Model width.")
    intermediate_size: int = Field(default=704, description="MLP width.")
    num_hidden_layers: int = Field(default=4, ge=1, description="Transformer blocks.")
    num_attention_heads: int = Field(default=4, ge=1, description="Query heads (head dim = hidden / heads).")
    num_key_value_heads: int = Field(default=4, ge=1, description="Key/value heads (GQA when fewer than query heads).")
    max_position_embeddings: int = Field(default=2048, description="Context length.")
    corpus_bytes: int = Field(default=3_000_000, description="Bytes of stdlib source used to train the tokenizer.")
    seed: int = Field(default=0, description="Seed of the weight initialisation.")

    @model_validator(mode="after")
    def _widths(self) -> TinyModelConfig:
        for field in ("vocab_size", "hidden_size", "intermediate_size"):
            if getattr(self, field) % 32:
                raise ValueError(f"{field} must be a multiple of 32")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


def corpus_files(limit_bytes: int) -> list[Path]:
    """Sorted stdlib sources up to ``limit_bytes`` in total (deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[Path] = []
    total = 0
    for p in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("[a-z]*/*.py")):
        if "test" in p.parts or "site-packages" in p.parts:
            continue
        size = p.stat().st_size
        if total + size > limit_bytes:
            continue
        out.append(p)
        total += size
    if not out:
        raise RuntimeError(f"no local text found under {stdlib} to train the tokenizer")
    return out


def train_tokenizer(cfg: TinyModelConfig, out_dir: Path) -> dict[str, int]:
    """Train and save a byte-level BPE tokenizer; returns the special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = [str(p) for p in corpus_files(cfg.corpus_bytes)]
    tok.train(files, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": IM_END,
                "pad_token": PAD,
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": cfg.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
                "additional_special_tokens": [IM_START, EOS],
            },
            indent=2,
        )
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": IM_END, "pad_token": PAD}, indent=2)
    )
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise RuntimeError(f"special tokens missing from the trained vocabulary: {missing}")
    return {t: int(i) for t, i in ids.items() if i is not None}


def build_default_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write the tokenizer and a seeded tiny Llama checkpoint to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = train_tokenizer(cfg, out)
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[IM_END], ids[EOS]],
        pad_token_id=ids[PAD],
    )
    torch.manual_seed(cfg.seed)
    model: Any = LlamaForCausalLM(llama_cfg)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = [ids[IM_END], ids[EOS]]
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.pad_token_id = ids[PAD]
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_embedding_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write the tokenizer and a seeded tiny Llama *encoder* (`LlamaModel`: no language-model head) to ``out_dir``.

    Laid out as a sentence-transformers checkpoint (`modules.json`: the transformer, mean pooling, normalisation):
    what marks a checkpoint as an embedding model to vLLM, which then serves it with its pooling runner, as it
    does a user's own. `is_matryoshka` lets clients ask for shorter vectors (`dimensions`), cut and normalised
    again by vLLM. Nothing is trained: the vectors are deterministic, not meaningful.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    cfg = cfg or TinyModelConfig(num_hidden_layers=2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = train_tokenizer(cfg, out)
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5, bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
        architectures=["LlamaModel"],
    )
    llama_cfg.is_matryoshka = True  # read by vLLM from config.json (not a transformers field)
    torch.manual_seed(cfg.seed)
    model: Any = LlamaModel(llama_cfg)
    model = model.to(torch.bfloat16)
    # The weights named as under a causal model (`model.layers...`): what vLLM's Llama loader reads, and what
    # transformers strips again (its base-model prefix) when it loads a `LlamaModel`.
    weights = {f"model.{name}": tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    llama_cfg.save_pretrained(out)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (out / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(modules)
    ], indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": cfg.hidden_size, "pooling_mode_mean_tokens": True}, indent=2))
    return out


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(build_default_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-chat"))
