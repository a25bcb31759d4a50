"""The CPU split between Ray's processes and vLLM's CPU worker."""

from __future__ import annotations

import pytest

from gateway.config import AppConfig
from raygate.stack import apply_core_split
from serve.hardware import split_cores


@pytest.mark.parametrize(
    ("cores", "ray", "engine"),
    [
        ([0], [0], [0]),
        ([0, 1], [0], [1]),
        ([3, 2], [2], [3]),
        (list(range(8)), [0, 1], [2, 3, 4, 5, 6, 7]),
    ],
)
def test_split_cores(cores: list[int], ray: list[int], engine: list[int]) -> None:
    assert split_cores(cores) == (ray, engine)


def _config(**model: object) -> AppConfig:
    return AppConfig.load({"serve": {"models": [{"model": "m", **model}]}})


def test_core_split_pins_cpu_vllm_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serve.hardware.available_cores", lambda: [0, 1])
    cfg = _config(engine="vllm")
    assert apply_core_split(cfg) == [0]
    assert cfg.serve.models[0].cpu_affinity == [1]


@pytest.mark.parametrize("model", [{"engine": "fake"}, {"engine": "vllm", "num_gpus": 1}, {"cpu_affinity": [0]}])
def test_core_split_leaves_other_setups_alone(monkeypatch: pytest.MonkeyPatch, model: dict[str, object]) -> None:
    monkeypatch.setattr("serve.hardware.available_cores", lambda: [0, 1])
    cfg = _config(**model)
    before = cfg.serve.models[0].cpu_affinity
    assert apply_core_split(cfg) is None
    assert cfg.serve.models[0].cpu_affinity == before


def test_core_split_needs_two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serve.hardware.available_cores", lambda: [0])
    assert apply_core_split(_config(engine="vllm")) is None
