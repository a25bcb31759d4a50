"""Tensor parallel 2 on CUDA GPUs (marked `gpu`): the default model served by one engine whose two vLLM workers run
as Ray actors in the placement group raygate builds for its replica (a CPU bundle, then a GPU bundle per worker),
against the same version on one GPU: the same greedy output, through the gateway and the official client.

It needs vLLM's CUDA build and two GPUs; where either is missing it is skipped with the reason, which
`pytest -m gpu -rs tests/gpu` prints. The two engines run one after the other, each in a stack of its own, so two
GPUs are enough.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_ports, greedy_tokens_agreeing

torch = pytest.importorskip("torch")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPUS < 2, reason=f"tensor parallel 2 needs two CUDA GPUs; this host has {GPUS}")]

PROMPTS = ["def fib(n):", "import os\nimport", "class Foo:\n    def", "The quick brown"]
TOKENS = 24


def _vllm_on_cuda() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed here (`make install` on a GPU host installs its CUDA build)")
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        pytest.skip(f"vLLM here is its {current_platform.device_name} build, not CUDA's")


@contextmanager
def serving(home: Path, model: dict[str, Any]) -> Iterator[str]:
    """A stack of its own serving `model` (one entry of `serve.models`); yields its base URL."""
    from gateway.config import AppConfig
    from raygate.cli import default_app_config
    from raygate.stack import Stack

    raw = default_app_config(home, "vllm")
    raw["serve"]["models"] = [model]
    port, dashboard, metrics = free_ports(3)
    stack = Stack(AppConfig.load(raw), port=port, dashboard_port=dashboard, metrics_export_port=metrics)
    try:
        stack.start(ready_timeout_s=600)
        yield stack.base_url
    finally:
        stack.stop()


def _greedy(base_url: str, key: str, model: str) -> list[Any]:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)
    return [client.completions.create(model=model, prompt=p, max_tokens=TOKENS, temperature=0, logprobs=2)
            .choices[0].logprobs for p in PROMPTS]


def _workers_in_the_replica_group() -> tuple[list[dict[str, Any]], list[Any]]:
    """The placement groups holding GPU bundles, and vLLM's Ray workers (their actors) alive now."""
    import ray
    from ray.util.state import list_actors

    groups = [g for g in ray.util.placement_group_table().values()
              if g["state"] == "CREATED" and any("GPU" in b for b in g["bundles"].values())]
    workers = list_actors(filters=[("class_name", "=", "RayWorkerWrapper"), ("state", "=", "ALIVE")], detail=True)
    return groups, workers


def test_two_gpu_workers_in_raygate_s_placement_group_give_one_gpu_s_greedy_output(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _vllm_on_cuda()
    from raygate import home as home_mod

    home = tmp_path_factory.mktemp("raygate-home")
    manifest = home_mod.ensure_default_model(home_mod.registry(home))
    _, key = home_mod.ensure_dev_key(home)
    version = f"{manifest.name}@{manifest.version}"
    engine = {"max_model_len": 1024, "gpu_memory_utilization": 0.3}
    with serving(home, {"model": version, "served_name": "tp1", "num_gpus": 1, "engine_kwargs": engine}) as url:
        one = _greedy(url, key, "tp1")
    tp2 = {"model": version, "served_name": "tp2", "num_gpus": 1,
           "engine_kwargs": {**engine, "tensor_parallel_size": 2}}
    with serving(home, tp2) as url:
        two = _greedy(url, key, "tp2")
        groups, workers = _workers_in_the_replica_group()
    matched = sum(greedy_tokens_agreeing(a, b) for a, b in zip(one, two, strict=True))
    print(f"\n[gpu] TP 2 on {torch.cuda.get_device_name()}: {matched} of {len(PROMPTS) * TOKENS} greedy tokens "
          f"as on one GPU; placement groups {[g['bundles'] for g in groups]}")
    assert matched >= len(PROMPTS) * TOKENS // 2, f"only {matched} greedy tokens agreed"
    # The replica's group: its own CPU bundle and one GPU bundle per worker, and both workers in it.
    assert len(groups) == 1 and sum(b.get("GPU", 0) for b in groups[0]["bundles"].values()) == 2, groups
    assert len(workers) == 2, workers
    assert {w.placement_group_id for w in workers} == {groups[0]["placement_group_id"]}, workers
