"""Build an engine from a deployment config: resolve the artifact and its variant, pick the implementation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from models.manifest import Manifest
from models.refs import ModelRef
from models.registry import Registry
from serve.artifact import Artifact
from serve.config import ModelDeploymentConfig
from serve.engine import Engine
from serve.variants import choose_variant

logger = logging.getLogger(__name__)


def checkpoint_dir(cfg: ModelDeploymentConfig) -> Path | None:
    """`cfg.model` as a checkpoint directory served as-is, or None for a registry reference."""
    candidate = Path(os.path.expanduser(cfg.model))
    return candidate.resolve() if candidate.is_dir() else None


def served_id(cfg: ModelDeploymentConfig) -> str:
    """The model id clients send for a deployment (the same for every version it serves)."""
    if cfg.served_name:
        return cfg.served_name
    directory = checkpoint_dir(cfg)
    if directory is not None:
        return directory.name
    if cfg.engine == "openai":
        return cfg.model
    try:
        return ModelRef.parse(cfg.model).name
    except ValueError:
        return cfg.model


def resolve_artifact(
    cfg: ModelDeploymentConfig, registry: Registry | None, manifest: Manifest | None = None
) -> Artifact:
    """The model a deployment serves: `manifest` (a version picked by a roll-out), else `cfg.model`.

    `cfg.model` is a registry reference, or a checkpoint directory served as-is. Of a
    registry version, the variant is the first of `cfg.variants` this hardware runs.
    """
    directory = checkpoint_dir(cfg) if manifest is None else None
    if directory is not None:
        return Artifact(str(directory), cfg.served_name or directory.name, str(directory), int(directory.stat().st_mtime))
    if registry is None:
        raise ValueError(f"{cfg.model!r} is not a directory and no registry is configured")
    manifest = manifest or registry.resolve(cfg.model)
    variant = choose_variant(manifest, cfg.variants, cfg.hardware, lora=cfg.lora)
    path = registry.local_path(manifest)
    if variant.path:
        path = path / variant.path
    logger.info("%s: serving variant %s (%s) on %s", manifest.ref, variant.name, variant.quantization or "full", cfg.hardware)
    return Artifact(str(path), cfg.served_name or manifest.name, manifest.ref, int(manifest.created.timestamp()), variant)


def create_engine(cfg: ModelDeploymentConfig, registry: Registry | None, manifest: Manifest | None = None) -> Engine:
    """The engine for one deployment (not started); `manifest` pins the version."""
    if cfg.engine == "fake":
        from serve.fake_engine import FakeEngine

        try:
            art = resolve_artifact(cfg, registry, manifest)
            name, root = art.served_name, art.root
        except (ValueError, LookupError):
            name, root = cfg.served_name or cfg.model, cfg.model
        return FakeEngine(name, cfg.fake, root=root)
    if cfg.engine == "openai":
        from serve.remote_engine import RemoteEngine

        assert cfg.upstream is not None
        return RemoteEngine(cfg.served_name or cfg.model, cfg.model, cfg.upstream)
    from serve.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, resolve_artifact(cfg, registry, manifest))
