"""Roll-out decisions as pure functions: which versions serve a followed alias, with what share.

The registry holds the state (aliases, canary splits, adapters); a replica reads it and
asks these functions what it should be serving. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from models.manifest import Manifest


def desired_weights(aliases: Mapping[str, int], traffic: Mapping[str, Mapping[str, Any]], follow: str) -> dict[int, float]:
    """Percent of traffic per version for a deployment following alias `follow`.

    The alias's version takes everything, unless a canary split of that alias is set and its
    canary alias points at another version: then the canary takes its percent.
    """
    if follow not in aliases:
        raise LookupError(f"alias {follow!r} is not set")
    base = aliases[follow]
    for canary, split in traffic.items():
        if split.get("of") != follow or canary not in aliases or aliases[canary] == base:
            continue
        percent = min(max(float(split.get("percent", 0.0)), 0.0), 100.0)
        if 0.0 < percent < 100.0:
            return {base: 100.0 - percent, aliases[canary]: percent}
    return {base: 100.0}


K = TypeVar("K")


def weighted_choice(options: Iterable[tuple[K, float]], u: float) -> K:
    """The option whose share of the total weight `u` (uniform in [0, 1)) falls in, in the order given.

    The one weighted pick: versions by traffic share here, route targets in `gateway/routing/routes.py`.
    Options of weight 0 (or less) are never chosen.
    """
    items = [(key, w) for key, w in options if w > 0]
    if not items:
        raise ValueError("no option has a weight above 0")
    threshold = u * sum(w for _, w in items)
    acc = 0.0
    for key, weight in items:
        acc += weight
        if threshold < acc:
            return key
    return items[-1][0]


def pick_version(weights: Mapping[int, float], u: float) -> int:
    """The version a request goes to, for `u` uniform in [0, 1); versions in ascending order."""
    return weighted_choice(sorted(weights.items()), u)


def adapters_for(base_ref: str, manifests: Iterable[Manifest]) -> dict[str, Manifest]:
    """Adapter id -> the newest published LoRA version trained on exactly `base_ref` (`name@version`)."""
    out: dict[str, Manifest] = {}
    for m in manifests:
        if m.format != "lora" or m.base_model != base_ref:
            continue
        if m.name not in out or m.version > out[m.name].version:
            out[m.name] = m
    return out
