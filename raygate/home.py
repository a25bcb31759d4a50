"""`$RAYGATE_HOME`: the registry, the dev key, and the default model built on first use."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from models.manifest import Manifest
from models.registry import ModelNotFound, Registry
from training.default_model import DEFAULT_EMBEDDING_MODEL_NAME, DEFAULT_MODEL_NAME


def home_dir(explicit: str | Path | None = None) -> Path:
    home = Path(explicit or os.environ.get("RAYGATE_HOME") or "~/.raygate").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def registry(home: Path) -> Registry:
    return Registry(home / "registry", cache_dir=home / "cache")


def ensure_dev_key(home: Path) -> tuple[Path, str]:
    """The dev key file (created with mode 0600 on first use) and its key."""
    return ensure_key_file(home / "dev-key", "rg-dev-")


def ensure_admin_key(home: Path) -> tuple[Path, str]:
    """The admin key for `/admin/*` (mode 0600), separate from every user key."""
    return ensure_key_file(home / "admin-key", "rg-admin-")


def ensure_key_file(path: Path, prefix: str) -> tuple[Path, str]:
    if path.exists():
        key = path.read_text().strip()
        if key:
            return path, key
    key = prefix + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path, key


def ensure_default_model(reg: Registry) -> Manifest:
    """Publish the default chat model as version 1 unless the registry already has it."""
    from training.default_model import build_default_model

    return _ensure_built(reg, DEFAULT_MODEL_NAME, build_default_model, "tiny Llama built locally")


def ensure_embedding_model(reg: Registry) -> Manifest:
    """Publish the default embedding model as version 1 unless the registry already has it."""
    from training.default_model import build_embedding_model

    return _ensure_built(reg, DEFAULT_EMBEDDING_MODEL_NAME, build_embedding_model,
                         "tiny Llama encoder built locally (sentence-transformers layout, mean pooling)")


def _ensure_built(reg: Registry, name: str, build: Callable[[str], object], description: str) -> Manifest:
    """`name@stable`; else its newest version made stable; else one built by `build` and published."""
    try:
        return reg.resolve(f"{name}@stable")
    except ModelNotFound:
        pass
    if reg.versions(name):
        manifest = reg.resolve(name)
        reg.set_alias(name, "stable", manifest.version)
        return manifest
    with tempfile.TemporaryDirectory(prefix="raygate-tiny-") as tmp:
        build(tmp)
        return reg.publish(name, tmp, metadata={"source": "training.default_model", "description": description},
                           aliases=["stable"])
