"""Build an engine from a deployment config: resolve the artifact, pick the implementation."""

from __future__ import annotations

import os
from pathlib import Path

from models.registry import Registry
from serve.config import ModelDeploymentConfig
from serve.engine import Engine


def resolve_artifact(cfg: ModelDeploymentConfig, registry: Registry | None) -> tuple[str, str, str, int]:
    """(local path, served name, root reference, created) of the model a deployment serves.

    `cfg.model` is a registry reference, or a checkpoint directory served as-is.
    """
    candidate = Path(os.path.expanduser(cfg.model))
    if candidate.is_dir():
        name = cfg.served_name or candidate.name
        return str(candidate.resolve()), name, str(candidate.resolve()), int(candidate.stat().st_mtime)
    if registry is None:
        raise ValueError(f"{cfg.model!r} is not a directory and no registry is configured")
    manifest = registry.resolve(cfg.model)
    path = registry.local_path(manifest)
    return str(path), cfg.served_name or manifest.name, manifest.ref, int(manifest.created.timestamp())


def create_engine(cfg: ModelDeploymentConfig, registry: Registry | None) -> Engine:
    """The engine for one deployment (not started)."""
    if cfg.engine == "fake":
        from serve.fake_engine import FakeEngine

        try:
            _, name, root, _ = resolve_artifact(cfg, registry)
        except (ValueError, LookupError):
            name, root = cfg.served_name or cfg.model, cfg.model
        return FakeEngine(name, cfg.fake, root=root)
    if cfg.engine == "openai":
        from serve.remote_engine import RemoteEngine

        assert cfg.upstream is not None
        return RemoteEngine(cfg.served_name or cfg.model, cfg.model, cfg.upstream)
    from serve.vllm_engine import VLLMEngine

    path, name, root, created = resolve_artifact(cfg, registry)
    return VLLMEngine(cfg, path, name, root=root, created=created)
