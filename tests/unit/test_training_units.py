"""Training pieces without Ray: dataset validation and loss masks, the gate, the config, the schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.dataset import IGNORE, Conversation, DatasetError, demo_conversations, load_jsonl, split, tokenize
from training.gate import decide
from training.loop import batches, lr_factor


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from training.default_model import TinyModelConfig, train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TinyModelConfig(corpus_bytes=300_000, vocab_size=1024), d)
    return AutoTokenizer.from_pretrained(d)


def test_only_assistant_tokens_are_learned(tokenizer) -> None:  # type: ignore[no-untyped-def]
    conv = Conversation.model_validate({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."},
    ]})
    ids, labels = tokenize(tokenizer, conv, 256)
    learned = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned.startswith("2 plus 2 is 4.") and "<|im_end|>" in learned
    assert "What is" not in learned and "be brief" not in learned
    assert tokenize(tokenizer, conv, 8) is None  # the answer does not fit: nothing to learn


def test_bad_dataset_lines_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DatasetError, match=r"d.jsonl:3"):
        load_jsonl(p)
    p.write_text("{not json\n")
    with pytest.raises(DatasetError, match=r":1"):
        load_jsonl(p)
    p.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    with pytest.raises(DatasetError, match="role"):
        load_jsonl(p)


def test_demo_set_and_split_are_deterministic() -> None:
    a, b = demo_conversations(300), demo_conversations(300)
    assert a == b and all(c.messages[-1].role == "assistant" for c in a)
    train, held = split(a, 0.1)
    assert split(a, 0.1) == (train, held) and 10 < len(held) < 60 and len(train) + len(held) == 300
    with pytest.raises(DatasetError):
        split(a[:1], 0.1)


def test_gate() -> None:
    assert decide(2.0, 1.5, 0.0).passed
    assert not decide(2.0, 2.01, 0.0).passed
    assert decide(2.0, 2.03, 0.02).passed
    assert not decide(2.0, float("nan"), 1.0).passed
    assert decide(2.0, 3.0, 0.0, enabled=False).passed
    assert "+50.0%" in decide(2.0, 3.0, 0.0).reason


def test_config_rules() -> None:
    with pytest.raises(ValueError, match="publish_adapter needs method"):
        TrainConfig(method="full", publish_adapter=True, quantize=[])
    with pytest.raises(ValueError, match="quantize"):
        TrainConfig(method="lora", publish_adapter=True)
    with pytest.raises(ValueError):
        TrainConfig(quantize=["gguf"])  # type: ignore[list-item]
    assert TrainConfig.load({"max_steps": 3}).max_steps == 3


def test_schedule_and_batches() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, batch_size=4)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) >= 0.1
    # Ranks see disjoint examples within a step; the order is the same on every run.
    r0, r1 = batches(64, cfg, 0, 2, 3), batches(64, cfg, 1, 2, 3)
    assert not set(r0) & set(r1) and r0 == batches(64, cfg, 0, 2, 3)
