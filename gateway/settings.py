"""Gateway settings, from the environment (`RAYGATE_*`) or passed in."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    return Path("~/.raygate").expanduser()


class GatewaySettings(BaseSettings):
    """How the gateway authenticates and bounds requests."""

    model_config = SettingsConfigDict(env_prefix="RAYGATE_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="State directory (registry, dev key).")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Keys accepted as `Authorization: Bearer <key>` (the dev key for now)."
    )
    api_keys_file: Path | None = Field(
        default=None, description="File with one accepted key per line (the dev key file); read at start."
    )
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="Longest a non-streaming request may take.")

    def accepted_keys(self) -> list[str]:
        """Every accepted key: `api_keys` plus the lines of `api_keys_file`."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines() if line.strip()]
        if not keys:
            raise ValueError("no API keys configured: set api_keys or api_keys_file")
        return keys

    @field_validator("home", "api_keys_file", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @field_validator("api_keys")
    @classmethod
    def _nonempty(cls, v: list[SecretStr]) -> list[SecretStr]:
        for key in v:
            if len(key.get_secret_value()) < 16:
                raise ValueError("API keys must be at least 16 characters")
        return v
