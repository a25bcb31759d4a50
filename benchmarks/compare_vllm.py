"""vLLM's own OpenAI server vs raygate's full stack on the same model, in one run.

Each target runs as its own process (`raygate up`, then
`python -m vllm.entrypoints.openai.api_server`), is measured at every concurrency, and is
stopped before the next starts, so the two never share the 2 cores. raygate goes first: the
dtype its engine picked for this hardware (read from `/v1/models`) is given to vLLM's server.
Prints the ratio table and writes JSON + Markdown.

    python -m benchmarks.compare_vllm --home ~/.raygate --concurrency 16 64 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.loadgen import run_point

MODEL = "raygate/tiny-chat"


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(base: str, key: str, points: list[int], max_tokens: int, duration: float) -> list[dict[str, Any]]:
    out = []
    for c in points:
        asyncio.run(run_point(base, key, MODEL, c, max_tokens, 3.0))  # warm-up at this concurrency
        res = asyncio.run(run_point(base, key, MODEL, c, max_tokens, duration))
        print(f"  c={c}: {res['output_tok_per_s']:.0f} tok/s, TTFT p50 {res['ttft_s']['p50']}, "
              f"errors {res['errors']}", flush=True)
        out.append(res)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default=os.path.expanduser("~/.raygate"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out-dir", default="benchmarks/results/vllm_vs_raygate")
    a = p.parse_args(argv)
    home = Path(a.home).expanduser()
    model_path = home / "registry" / MODEL / "versions" / "1"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    results: dict[str, Any] = {}

    # raygate first: the dtype its engine chose for this hardware is then given to vLLM's server.
    print("raygate ...", flush=True)
    rg = subprocess.Popen([str(bin_dir / "raygate"), "--home", str(home), "up"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready("http://127.0.0.1:8000/ready", 400, rg)
        key = (home / "dev-key").read_text().strip()
        req = urllib.request.Request("http://127.0.0.1:8000/v1/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            dtype = json.loads(resp.read())["data"][0].get("dtype") or "auto"
        print(f"  engine dtype: {dtype}", flush=True)
        results["raygate"] = measure("http://127.0.0.1:8000/v1", key, a.concurrency, a.max_tokens, a.duration)
    finally:
        stop(rg)

    print("vLLM server ...", flush=True)
    vllm = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
         "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", "8100", "--max-model-len", "2048",
         "--max-num-seqs", "256", "--generation-config", "vllm", "--dtype", dtype],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready("http://127.0.0.1:8100/health", 300, vllm)
        results["vllm"] = measure("http://127.0.0.1:8100/v1", "", a.concurrency, a.max_tokens, a.duration)
    finally:
        stop(vllm)
    results["dtype"] = dtype

    rows = [f"dtype: {dtype}", "", "| streams | vLLM tok/s | raygate tok/s | ratio | vLLM TTFT p50 (ms) | raygate TTFT p50 (ms) | TTFT ratio |",
            "|---|---|---|---|---|---|---|"]
    for v, r in zip(results["vllm"], results["raygate"]):
        vt, rt = v["ttft_s"]["p50"] or 0, r["ttft_s"]["p50"] or 0
        rows.append(f"| {v['concurrency']} | {v['output_tok_per_s']:.0f} | {r['output_tok_per_s']:.0f} | "
                    f"{r['output_tok_per_s'] / max(v['output_tok_per_s'], 1e-9):.2f} | {vt * 1000:.0f} | "
                    f"{rt * 1000:.0f} | {rt / max(vt, 1e-9):.2f} |")
    table = "\n".join(rows)
    print(table)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
