"""`raygate train CONFIG.yaml`: fine-tune, gate, quantize and publish (see training.pipeline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from raygate import home as home_mod

EXIT_GATE_REFUSED = 3


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="Fine-tune a registered model on Ray Train, gate it, quantize it, publish it.")
    p.add_argument("config", nargs="?", help="TrainConfig YAML (default: LoRA of the default model on the demo set).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config field (YAML value), e.g. --set max_steps=20 --set method=full.")
    p.add_argument("--report", help="Write the result (gate, metrics, timings, version) to this JSON file.")


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from training.config import TrainConfig
    from training.pipeline import run_pipeline

    home = home_mod.home_dir(args.home)
    data: dict[str, Any] = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
        _assign(data, key.split("."), yaml.safe_load(value))
    cfg = TrainConfig.load(data)
    reg = home_mod.registry(home) if cfg.registry is None else home_mod.Registry(cfg.registry, cache_dir=home / "cache")
    if cfg.base_model.startswith(home_mod.DEFAULT_MODEL_NAME):
        home_mod.ensure_default_model(reg)
    result = run_pipeline(cfg, reg, home)
    if args.report:
        Path(args.report).write_text(result.model_dump_json(indent=2))
    print(json.dumps({"gate": result.gate.reason, "timings_s": result.timings_s}, indent=2))
    if result.published is None:
        print("raygate: the gate refused the model; nothing was published")
        return EXIT_GATE_REFUSED
    m = result.published
    print(f"published {m.ref} (base {m.base_model}); variants: "
          + (", ".join(f"{v.name} [{'/'.join(v.runs_on)}]" for v in m.variants) or m.format))
    print(f"roll it out: raygate models promote {m.ref} --alias stable   (or --canary 10)")
    return 0


def _assign(data: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value
