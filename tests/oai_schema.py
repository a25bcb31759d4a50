"""Validate response bodies against the schemas of OpenAI's official OpenAPI spec."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SPEC_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "openai" / "openapi.yaml",
    Path(__file__).resolve().parents[1] / ".." / "shared" / "openai" / "openapi.yaml",
]


@functools.cache
def spec() -> dict[str, Any]:
    for path in SPEC_CANDIDATES:
        if path.exists():
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            with open(path) as f:
                return yaml.load(f, Loader=loader)
    raise FileNotFoundError("OpenAI's openapi.yaml not found beside the repository (../shared/openai/)")


def _nullable_to_json_schema(node: Any) -> Any:
    """Translate OpenAPI 3.0's `nullable: true` (still used in this 3.1 document) to JSON Schema."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_json_schema(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        if "type" in out and not isinstance(out["type"], list):
            out["type"] = [out["type"], "null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    doc = _nullable_to_json_schema(spec())
    resource = Resource.opaque(doc)
    registry = Registry().with_resource("urn:openai", resource)
    return Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{schema_name}"}, registry=registry)


def assert_valid(schema_name: str, body: Any) -> None:
    errors = sorted(validator(schema_name).iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{schema_name}: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5]
    )
