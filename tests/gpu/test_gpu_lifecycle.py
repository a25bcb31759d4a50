"""The training and quantization steps on a CUDA GPU (marked `gpu`; they need no vLLM and no Ray).

Run where a GPU is: `pytest -m gpu tests/gpu`. Prints timings for the closing notes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(base: Path) -> tuple[list, list, int]:
    from transformers import AutoTokenizer

    from training.checkpoint_files import pad_id
    from training.dataset import demo_conversations, split, tokenize

    tok = AutoTokenizer.from_pretrained(base)
    train, held = split(demo_conversations(1200), 0.1)
    return [tokenize(tok, c, 256) for c in train], [tokenize(tok, c, 256) for c in held], pad_id(tok)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_use_gpu_training_steps_lower_the_loss(base: Path, data: tuple[list, list, int], method: str) -> None:
    from training.config import TrainConfig
    from training.dataset import collate
    from training.evaluate import loss_of
    from training.loop import batches, build_model, lr_factor, trainable

    train_ex, held_ex, pad = data
    cfg = TrainConfig(method=method, use_gpu=True, max_steps=60, batch_size=32, learning_rate=3e-3)
    device = torch.device("cuda")
    model = build_model(str(base), cfg, device)
    before = loss_of(model, held_ex, pad)
    params = list(trainable(model).values())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(cfg.max_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        batch = {k: v.to(device) for k, v in collate([train_ex[i] for i in batches(len(train_ex), cfg, 0, 1, step)], pad).items()}
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    after = loss_of(model, held_ex, pad)
    print(f"\n[gpu] {method}: {cfg.max_steps} steps in {elapsed:.2f}s ({cfg.max_steps / elapsed:.1f} steps/s), "
          f"held-out loss {before:.3f} -> {after:.3f} on {torch.cuda.get_device_name()}")
    assert after < before * (0.8 if method == "full" else 0.99)


def test_bitsandbytes_and_w8a8_on_cuda(base: Path, data: tuple[list, list, int], tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluate import evaluate_checkpoint
    from training.quantize import quantize

    _, held_ex, pad = data
    full = evaluate_checkpoint(base, held_ex, pad)
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].cuda()
    layers = {"bnb-8bit": bnb.nn.Linear8bitLt, "bnb-nf4": bnb.nn.Linear4bit}
    for kind in ("bnb-8bit", "bnb-nf4", "int8-w8a8"):
        t0 = time.perf_counter()
        out = quantize(base, tmp_path / kind, kind)
        took = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cuda")
        if kind in layers:
            assert isinstance(model.model.layers[0].self_attn.q_proj, layers[kind])
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert gen.shape[1] > ids.shape[1]
        ev = evaluate_checkpoint(out, held_ex, pad)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"\n[gpu] {kind}: quantized in {took:.2f}s, {size / 1e6:.1f} MB, held-out loss {ev['loss']:.4f} "
              f"(full {full['loss']:.4f})")
        assert abs(ev["loss"] - full["loss"]) < 0.05 * full["loss"]
