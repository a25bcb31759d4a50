"""A tensor-parallel engine on vLLM's CPU build (two workers, each on its own share of the cores), served by the
shared stack beside the single-worker engine of the same version: the same greedy output, through the gateway.

The default model is untrained, so its logits hold near-ties; the two workers sum their partial products in
another order (bf16), which may break such a tie the other way: `greedy_tokens_agreeing`."""

from __future__ import annotations

import openai
import psutil

from tests.integration.conftest import TP_MODEL, LiveStack
from tests.support import greedy_tokens_agreeing

PROMPTS = ["def fib(n):", "import os\nimport", "class Foo:\n    def", "The quick brown"]


def test_two_tensor_parallel_workers_give_the_single_worker_s_greedy_output(stack: LiveStack) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0, timeout=120)
    matched = 0
    for prompt in PROMPTS:
        one, two = (client.completions.create(model=m, prompt=prompt, max_tokens=24, temperature=0, logprobs=2)
                    for m in (stack.model, TP_MODEL))
        matched += greedy_tokens_agreeing(one.choices[0].logprobs, two.choices[0].logprobs)
    assert matched >= len(PROMPTS) * 24 // 2, f"only {matched} greedy tokens agreed"
    # Its two workers are running: vLLM's processes of ranks 0 and 1.
    ranks = [p for p in psutil.process_iter(["cmdline"]) if "VLLM::Worker_TP" in " ".join(p.info["cmdline"] or [])]
    assert len(ranks) == 2, [p.info["cmdline"] for p in ranks]
