"""The artifact manifest: what a published model version contains, with checksums."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

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


ArtifactFormat = Literal["hf", "lora"]

class FileEntry(BaseModel):
    """One file of an artifact."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Path relative to the version directory, '/'-separated.")
    sha256: str = Field(description="Hex SHA-256 of the file's bytes.")
    size: int = Field(ge=0, description="Size in bytes.")


Hardware = Literal["cpu", "gpu"]


class Variant(BaseModel):
    """One form of a version's weights (full precision or a quantization) stored beside the others."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Variant name: 'full', 'int8-w8a8', 'bnb-8bit', 'bnb-nf4'.")
    path: str = Field(description="Directory of the variant relative to the version directory ('' = the root).")
    quantization: str | None = Field(default=None, description="Weight format (None: the checkpoint's own dtype).")
    runs_on: list[Hardware] = Field(description="Hardware whose serving engine loads this variant.")
    size: int = Field(default=0, ge=0, description="Bytes of the variant's files.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation of this variant (held-out loss...).")


class Manifest(BaseModel):
    """Describes one immutable model version in the registry."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Model name, e.g. 'raygate/tiny-chat'.")
    version: int = Field(ge=1, description="Version number, assigned by the registry at publish.")
    format: ArtifactFormat = Field(
        default="hf",
        description="Artifact format: 'hf' (a Hugging Face checkpoint directory) or 'lora' (a PEFT adapter of `base_model`)."
    )
    quantization: str | None = Field(default=None, description="Quantization of the weights, None for full precision.")
    base_model: str | None = Field(default=None, description="Reference of the model this one was derived from.")
    files: list[FileEntry] = Field(description="Every file of the version with its checksum.")
    variants: list[Variant] = Field(
        default_factory=list, description="Forms of the weights in this version; empty: the root checkpoint only."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics (loss, perplexity...).")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form metadata (source path, notes).")
    created: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When the version was published (UTC)."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return validate_name(v)

    @property
    def ref(self) -> str:
        """The exact reference of this version, ``name@version``."""
        return f"{self.name}@{self.version}"

    def all_variants(self) -> list[Variant]:
        """The listed variants, or the root checkpoint as variant 'full' where none are listed."""
        if self.variants:
            return list(self.variants)
        return [Variant(name="full", path="", quantization=self.quantization, runs_on=["cpu", "gpu"],
                        size=self.total_size)]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)
