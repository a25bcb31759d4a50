"""What a deployment serves: the files of one model version (or checkpoint) and how clients see it."""

from __future__ import annotations

from dataclasses import dataclass

from models.manifest import Variant


@dataclass(frozen=True)
class Artifact:
    """The files a deployment serves and how clients see them."""

    path: str
    served_name: str
    root: str
    created: int
    variant: Variant | None = None
