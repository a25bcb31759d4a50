"""Chat datasets: OpenAI `messages` JSONL, the demo set raygate writes itself, tokenization with loss masks.

One conversation per line: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}``,
ending with an assistant turn. Only assistant tokens are learned (the rest is masked with
-100), so the model learns to answer rather than to repeat prompts. Tokenization goes
through the checkpoint's own chat template: a user's checkpoint takes the same path.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

IGNORE = -100


class Message(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


class Conversation(BaseModel):
    messages: list[Message] = Field(min_length=2, description="Turns, ending with the assistant's.")

    @field_validator("messages")
    @classmethod
    def _ends_with_answer(cls, v: list[Message]) -> list[Message]:
        if v[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's")
        if not any(m.role == "user" for m in v):
            raise ValueError("a conversation needs a user message")
        return v


class DatasetError(ValueError):
    """A dataset file that cannot be used, with the line that is wrong."""


def load_jsonl(path: str | Path) -> list[Conversation]:
    """Read and validate a chat JSONL file (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Conversation.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise DatasetError(f"{path}:{lineno}: not a chat example ({_short(exc)})") from None
    if not out:
        raise DatasetError(f"{path} holds no examples")
    return out


def split(examples: list[Conversation], eval_fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic train/held-out split by a hash of each conversation (stable as the file grows)."""
    train: list[Conversation] = []
    held: list[Conversation] = []
    for ex in examples:
        digest = hashlib.sha256(ex.model_dump_json().encode()).digest()
        (held if int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction else train).append(ex)
    if not train or not held:
        raise DatasetError(f"{len(examples)} examples do not make both a training and a held-out split")
    return train, held


def tokenize(tokenizer: Any, conv: Conversation, max_len: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) with only assistant turns learned; None if nothing learnable fits in `max_len`."""
    messages = [m.model_dump() for m in conv.messages]
    ids = _template(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_template(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_template(tokenizer, messages[: i + 1], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_len], labels[:max_len]
    if all(t == IGNORE for t in labels[1:]):
        return None
    return ids, labels


def _template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)


# ---- the demo dataset ----------------------------------------------------------------------
_WORDS = (
    "ray serve gateway model token quota route canary stable replica engine batch stream cache kernel tensor "
    "python lambda socket thread queue vector matrix signal buffer packet cluster worker driver actor task"
).split()
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SYSTEM = "You are raygate's demo assistant. Answer briefly."


def demo_conversations(n: int = 1200, seed: int = 0) -> list[Conversation]:
    """A small chat dataset raygate writes itself (arithmetic, spelling, facts about raygate): no download."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            w = rng.choice(_WORDS)
            q, ans = f"Spell {w} backwards.", f"{w} backwards is {w[::-1]}."
        elif kind == 2:
            w = rng.choice(_WORDS)
            q, ans = f"How many letters are in {w}?", f"{w} has {len(w)} letters."
        elif kind == 3:
            phrase = f"the {rng.choice(_COLOURS)} {rng.choice(_WORDS)}"
            q, ans = f"Repeat after me: {phrase}.", f"{phrase}."
        else:
            w = rng.choice(_WORDS)
            q, ans = f"Write {w} in capitals.", f"{w.upper()}"
        messages = [Message(role="user", content=q), Message(role="assistant", content=ans)]
        if rng.random() < 0.5:
            messages.insert(0, Message(role="system", content=SYSTEM))
        out.append(Conversation(messages=messages))
    return out


def write_demo_dataset(path: str | Path, n: int = 1200, seed: int = 0) -> Path:
    """Write the demo dataset as chat JSONL (the format users bring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for conv in demo_conversations(n, seed):
            f.write(conv.model_dump_json() + "\n")
    tmp.replace(path)
    return path


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch of (ids, labels) into tensors with an attention mask."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
