"""What requests a benchmark sends: endpoint, streaming, prompt and output lengths, or a dataset."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Short common words: most tokenizers (and the fake engines, which count words) see one token each.
WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many some so"
).split()


class Length(BaseModel):
    """A token count: fixed (`fixed`) or drawn uniformly from [`min`, `max`] per request."""

    model_config = ConfigDict(extra="forbid")

    fixed: int | None = Field(default=None, ge=1, description="Every request uses this many tokens.")
    min: int | None = Field(default=None, ge=1, description="Lower bound of a uniform draw.")
    max: int | None = Field(default=None, ge=1, description="Upper bound of a uniform draw (inclusive).")

    @model_validator(mode="before")
    @classmethod
    def _from_int(cls, v: Any) -> Any:
        return {"fixed": v} if isinstance(v, int) else v

    @model_validator(mode="after")
    def _one_form(self) -> Length:
        if (self.fixed is None) == (self.min is None or self.max is None):
            raise ValueError("give either `fixed` or both `min` and `max`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min > max")
        return self

    def draw(self, rng: random.Random) -> int:
        return self.fixed if self.fixed is not None else rng.randint(self.min or 1, self.max or 1)


class Workload(BaseModel):
    """The requests of one workload; every draw is seeded, so two targets get the same sequence."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="default", description="Label in reports.")
    endpoint: Literal["chat", "completion"] = Field(default="chat", description="/v1/chat/completions or /v1/completions.")
    stream: bool = Field(default=True, description="SSE streaming (TTFT/ITL measured) or one JSON body.")
    prompt_tokens: Length = Field(default_factory=lambda: Length(fixed=32), description="Prompt length (approx. tokens).")
    output_tokens: Length = Field(default_factory=lambda: Length(fixed=128), description="max_tokens per request.")
    exact_output: bool = Field(
        default=False, description="Also send `min_tokens`/`ignore_eos` (vLLM) so every request generates max_tokens."
    )
    dataset: Path | None = Field(
        default=None,
        description="JSONL of requests (`messages` or `prompt`, optional `max_tokens`); replaces the synthetic prompts.",
    )
    model: str | None = Field(default=None, description="Overrides the target's model for this workload.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Fields added to every request body.")
    seed: int = Field(default=0, description="Seed of the length draws and dataset order.")

    def path(self) -> str:
        return "/chat/completions" if self.endpoint == "chat" else "/completions"

    def bodies(self, model: str) -> Iterator[dict[str, Any]]:
        """An endless, reproducible sequence of request bodies."""
        rng = random.Random(self.seed)
        rows = load_dataset(self.dataset) if self.dataset else None
        i = 0
        while True:
            if rows:
                row = rows[i % len(rows)]
                prompt = row.get("messages") or row.get("prompt") or ""
                max_tokens = int(row.get("max_tokens") or self.output_tokens.draw(rng))
            else:
                prompt = " ".join(rng.choice(WORDS) for _ in range(self.prompt_tokens.draw(rng)))
                max_tokens = self.output_tokens.draw(rng)
            yield self._body(model or "", prompt, max_tokens)
            i += 1

    def _body(self, model: str, prompt: Any, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model or model, "max_tokens": max_tokens, "temperature": 0}
        if self.endpoint == "chat":
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self.exact_output:
            body["min_tokens"] = max_tokens
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body


def load_dataset(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL dataset; each needs `messages` (OpenAI chat format) or `prompt`."""
    rows = []
    for n, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not (row.get("messages") or row.get("prompt")):
            raise ValueError(f"{path}:{n}: each line needs `messages` or `prompt`")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no requests")
    return rows
