"""docs/configuration.md, generated from the typed configs' field descriptions so the reference cannot drift.

    python -m raygate.config_reference > docs/configuration.md     (or: make docs)

A test regenerates it and compares (tests/unit/test_config_reference.py).
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.config import AppConfig
from gateway.settings import GatewaySettings
from serve.config import CPU_VLLM_DEFAULTS, VLLM_DEFAULTS, ServeConfig
from training.config import TrainConfig

HEAD = """# Configuration reference

Generated from the typed configs by `python -m raygate.config_reference` (`make docs`); a test fails when
this file is out of date. Every field is described where it is declared; unknown fields are refused.

- **`raygate up --config F`**, **`raygate gateway --config F`** and `serve run gateway.builder:build_app`
  take an [AppConfig](#appconfig): the gateway deployment and the models it serves.
- The gateway's [settings](#gatewaysettings) sit under `gateway.settings`; each can also come from the
  environment as `RAYGATE_<FIELD>` (for example `RAYGATE_REDIS_URL`).
- **`raygate train F`** takes a [TrainConfig](#trainconfig).

A minimal AppConfig:

```yaml
gateway:
  settings:
    redis_url: redis://127.0.0.1:6379/0   # quotas shared by several gateway replicas
serve:
  models:
    - model: raygate/tiny-chat@stable     # a registry reference, or a checkpoint directory
      engine_kwargs: {max_model_len: 2048} # vLLM's own arguments, as on `vllm serve`
```
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation)).replace("SecretStr", "secret")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        if getattr(field.default_factory, "__name__", "") == "default_home":
            return "`~/.raygate`"
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(its defaults)"
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    return f"`{json.dumps(value, default=str)}`"


def _nested(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _nested(a)]


def _section(model: type[BaseModel], seen: set[type[BaseModel]], out: list[str]) -> None:
    if model in seen:
        return
    seen.add(model)
    out += ["", f"## {model.__name__}", "", (model.__doc__ or "").strip().splitlines()[0], "",
            "| field | type | default | what it does |", "|---|---|---|---|"]
    children: list[type[BaseModel]] = []
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        children += _nested(field.annotation)
    for child in children:
        _section(child, seen, out)


def render() -> str:
    out = [HEAD.rstrip()]
    seen: set[type[BaseModel]] = set()
    for model in (AppConfig, GatewaySettings, ServeConfig):
        _section(model, seen, out)
    out += ["", "## vLLM arguments", "",
            "A vLLM model's `engine_kwargs` are vLLM's own arguments (`python -m vllm.entrypoints.openai.api_server "
            "--help` lists them), in snake_case. raygate fills in these where `engine_kwargs` names none:", "",
            "| argument | raygate's default | on |", "|---|---|---|"]
    out += [f"| `{k}` | `{json.dumps(v)}` | every vLLM engine |" for k, v in VLLM_DEFAULTS.items()]
    out += [f"| `{k}` | `{json.dumps(v)}` | CPU engines |" for k, v in CPU_VLLM_DEFAULTS.items()]
    out += ["| `dtype` | `\"float32\"` | CPU engines on a CPU without native bf16 (AVX-512-BF16 or AMX) |",
            "| `enable_lora` | `true` | models with `lora: true` |"]
    _section(TrainConfig, seen, out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
