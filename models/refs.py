"""Parsing model references: ``name``, ``name@3``, ``name@stable``."""

from __future__ import annotations

from dataclasses import dataclass

from models.manifest import validate_alias, validate_name

LATEST = "latest"


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: a name plus either a version number or an alias."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        """Parse ``name[@version|@alias]``; a bare name means the ``latest`` alias."""
        name, sep, tail = ref.strip().partition("@")
        validate_name(name)
        if not sep:
            return cls(name=name, alias=LATEST)
        if tail.isdigit():
            if int(tail) < 1:
                raise ValueError(f"invalid version in {ref!r}: versions start at 1")
            return cls(name=name, version=int(tail))
        return cls(name=name, alias=validate_alias(tail))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}"
