"""Routing by conversation vs Serve's default router: vLLM's prefix-cache hits on a multi-turn workload, one run.

Starts `raygate up` with the default chat model served twice, each as a deployment of its own with two
replicas (two engines, two prefix caches): `by-conversation` (`routing: conversation`, raygate's default;
`--routing prefix_tree`: `by-prefix-tree`, Ray Serve LLM's prefix-aware router) and `by-load` (`routing: load`, Serve's default router: the less busy of two random replicas). The same
multi-turn workload runs against both at once, interleaved: conversations with an opening of their own
(several KV blocks) and growing histories, several in flight. vLLM reports each request's cached prompt
tokens (`usage.prompt_tokens_details.cached_tokens`); the figure is the share of the prompt tokens of
turns 2 and later that came from the cache, and the prefill tokens left to compute. Hardware-independent:
it counts tokens, not seconds (TTFT is printed beside it).

    python -m benchmarks.prefix_routing --conversations 16 --turns 6 --streams 4
    python -m benchmarks.prefix_routing --kv-blocks 96   # caches that hold a replica's share, not everything
    python -m benchmarks.prefix_routing --routing prefix_tree   # Ray Serve LLM's prefix-aware router instead
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

KEY = "rg-prefix-bench-0123456789abcdefghij"


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def _targets(routing: str) -> dict[str, str]:
    """The two deployments compared, by served name: `routing`'s and Serve's default router's."""
    return {f"by-{routing.replace('_', '-')}": routing, "by-load": "load"}


def _config(home: Path, replicas: int, kv_blocks: int | None, targets: dict[str, str]) -> dict[str, object]:
    engine: dict[str, object] = {"max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20}
    if kv_blocks:  # vLLM's own cap on the cache, in blocks (128 tokens each on CPUs), whatever the dtype
        engine["num_gpu_blocks_override"] = kv_blocks
    return {
        "gateway": {"settings": {"home": str(home), "api_keys": [KEY]}},
        "serve": {"models": [
            {"model": "raygate/tiny-chat@stable", "served_name": name, "placement": "deployment", "routing": routing,
             "num_replicas": replicas, "num_cpus": 0, "engine_kwargs": engine}
            for name, routing in targets.items()
        ]},
    }


def _wait_for_replicas(home: Path, dashboard: int, names: list[str], replicas: int, timeout_s: float = 900) -> None:
    """Until every replica of each target runs (`raygate status`): a workload started while some are still
    starting sends the first turns to the replicas already up, and a router that remembers where prompts went
    keeps them there."""
    want = [f"deployment {name}@stable: HEALTHY  replicas: RUNNING={replicas}" for name in names]
    exe = str(Path(sys.executable).with_name("raygate"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([exe, "--home", str(home), "status", "--dashboard-port", str(dashboard)],
                             capture_output=True, text=True, env=env, timeout=120).stdout
        if all(line in out for line in want):
            return
        time.sleep(5)
    raise SystemExit(f"not every replica ran after {timeout_s:.0f} s:\n{out}")


def _conversation(client: openai.OpenAI, model: str, index: int, turns: int) -> list[dict[str, float]]:
    words = " ".join(f"c{index}w{i}" for i in range(200))  # an opening of its own, several KV blocks long
    messages: list[Any] = [{"role": "system", "content": f"Document {index}: {words}"},
                                      {"role": "user", "content": "Summarise it."}]
    out = []
    for turn in range(turns):
        started = time.perf_counter()
        first = None
        text, usage = [], None
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert usage is not None
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0
        out.append({"turn": turn, "prompt": usage.prompt_tokens, "cached": cached,
                    "ttft_ms": ((first or time.perf_counter()) - started) * 1000})
        messages += [{"role": "assistant", "content": "".join(text) or "."},
                     {"role": "user", "content": f"Now part {turn + 1} of document {index}, in more detail."}]
    return out


def _summary(turns: list[dict[str, float]]) -> dict[str, float]:
    later = [t for t in turns if t["turn"] > 0]
    prompt, cached = sum(t["prompt"] for t in later), sum(t["cached"] for t in later)
    return {"turns": len(later), "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": round(cached / prompt, 4) if prompt else 0.0, "prefill_tokens": prompt - cached,
            "ttft_p50_ms": round(statistics.median(t["ttft_ms"] for t in later), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=16, help="Conversations per target.")
    p.add_argument("--turns", type=int, default=6, help="Turns per conversation.")
    p.add_argument("--streams", type=int, default=4, help="Conversations in flight per target.")
    p.add_argument("--replicas", type=int, default=2, help="Replicas of each target's deployment.")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="Each engine's KV cache in blocks (vLLM's num_gpu_blocks_override). Unset: room for every "
                        "conversation on every replica; set below the whole workload's blocks but above a "
                        "replica's share, it is the regime of a busy deployment, where a cache holds only part "
                        "of what its replicas' clients talk about.")
    p.add_argument("--routing", default="conversation", choices=["conversation", "prefix_tree"],
                   help="The routing compared with Serve's default router (a model's `routing`).")
    p.add_argument("--home", default=".bench/home", help="raygate home (the default model is built there once).")
    p.add_argument("--out-dir", default="benchmarks/results/prefix_routing")
    a = p.parse_args(argv)
    home = Path(a.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "prefix-routing.yaml"
    targets = _targets(a.routing)
    cfg.write_text(yaml.safe_dump(_config(home, a.replicas, a.kv_blocks, targets)))
    port, dashboard, metrics = _ports(3)
    base = f"http://127.0.0.1:{port}"
    log = open(home / "prefix-routing.log", "wb")  # noqa: SIM115 - open for the stack's lifetime
    proc = subprocess.Popen([str(Path(sys.executable).with_name("raygate")), "--home", str(home), "up", "--config",
                             str(cfg), "--port", str(port), "--dashboard-port", str(dashboard), "--metrics-port",
                             str(metrics)], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"raygate up exited ({proc.returncode}); see {home / 'prefix-routing.log'}")
            time.sleep(1)
        _wait_for_replicas(home, dashboard, list(targets), a.replicas)
        client = openai.OpenAI(api_key=KEY, base_url=base + "/v1", max_retries=0, timeout=300)
        jobs = [(name, i) for i in range(a.conversations) for name in targets]  # interleaved: both at once
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        with ThreadPoolExecutor(a.streams * len(targets)) as pool:
            futures = [(name, pool.submit(_conversation, client, name, i, a.turns)) for name, i in jobs]
            for name, future in futures:
                results[name] += future.result()
    finally:
        proc.send_signal(2)
        proc.wait(120)
    summary = {name: _summary(turns) for name, turns in results.items()}
    routed = next(iter(targets))
    ratio = summary[routed]["hit_rate"] / max(summary["by-load"]["hit_rate"], 1e-9)
    prefill = summary[routed]["prefill_tokens"] / max(summary["by-load"]["prefill_tokens"], 1)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "summary": summary, "hit_rate_ratio": ratio,
                                                   "prefill_ratio": prefill, "turns": results}, indent=2))
    cache = f"a KV cache of {a.kv_blocks} blocks per engine" if a.kv_blocks else "a KV cache with room for all"
    md = (f"{a.conversations} conversations x {a.turns} turns per target, {a.streams} in flight each, "
          f"{a.replicas} replicas per deployment, {cache}; turns 2-{a.turns}:\n\n"
          "| routing | prompt tokens | cached | hit rate | prefill computed | TTFT p50 ms |\n|---|---|---|---|---|---|\n"
          + "".join(f"| {n} | {s['prompt_tokens']} | {s['cached_tokens']} | {s['hit_rate']:.2f} | "
                    f"{s['prefill_tokens']} | {s['ttft_p50_ms']} |\n" for n, s in summary.items())
          + f"\nHit rate {routed} / by-load: **{ratio:.2f}x**; prefill tokens computed: {prefill:.2f}x.\n")
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
