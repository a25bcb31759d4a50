"""The artifact manifest: what a published model version contains, with checksums."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
MANIFEST_FILE = "manifest.json"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (``org/model`` or ``model``)."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '.', '_', '-' and at most one '/'"
        )
    return name


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it is a valid alias name (it must not look like a version)."""
    if not ALIAS_RE.match(alias):
        raise ValueError(f"invalid alias {alias!r}: start with a letter; letters, digits, '.', '_', '-'")
    return alias


class FileEntry(BaseModel):
    """One file of an artifact."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Path relative to the version directory, '/'-separated.")
    sha256: str = Field(description="Hex SHA-256 of the file's bytes.")
    size: int = Field(ge=0, description="Size in bytes.")


class Manifest(BaseModel):
    """Describes one immutable model version in the registry."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Model name, e.g. 'raygate/tiny-chat'.")
    version: int = Field(ge=1, description="Version number, assigned by the registry at publish.")
    format: str = Field(default="hf", description="Artifact format; 'hf' is a Hugging Face checkpoint directory.")
    quantization: str | None = Field(default=None, description="Quantization of the weights, None for full precision.")
    base_model: str | None = Field(default=None, description="Reference of the model this one was derived from.")
    files: list[FileEntry] = Field(description="Every file of the version with its checksum.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics (loss, perplexity...).")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form metadata (source path, notes).")
    created: datetime = Field(
        default_factory=lambda: datetime.now(timezone.utc), description="When the version was published (UTC)."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return validate_name(v)

    @property
    def ref(self) -> str:
        """The exact reference of this version, ``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)
