"""docs/configuration.md is what the typed configs say now."""

from __future__ import annotations

from pathlib import Path

from raygate.config_reference import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_is_current() -> None:
    assert DOC.read_text() == render(), "docs/configuration.md is out of date: run `make docs`"


def test_every_config_field_is_in_the_reference() -> None:
    from gateway.config import AppConfig
    from gateway.settings import GatewaySettings
    from serve.config import ModelDeploymentConfig
    from training.config import TrainConfig

    text = render()
    for model in (AppConfig, GatewaySettings, ModelDeploymentConfig, TrainConfig):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name}"
