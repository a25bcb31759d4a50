"""What a Redis quota check adds to a request: one gateway, two keys, interleaved, one run.

Starts `raygate gateway` (uvicorn, fake engine, quotas in the machine's Redis) as its own
process, creates an unlimited key (no quota call) and a key with rpm/tpm/concurrency
limits high enough never to refuse (a Redis admit + settle per request), then sends
requests at concurrency 1 alternating between the two keys. Prints the p50 difference.

    python -m benchmarks.quota_overhead --requests 2000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ADMIN = "rg-admin-bench-0123456789abcdefghij"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="Requests per key.")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--out-dir", default="benchmarks/results/quota_overhead")
    a = p.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="rg-quota-bench-"))
    cfg = home / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"settings": {"home": str(home), "redis_url": a.redis_url}},
        "serve": {"models": [{"model": "fake", "engine": "fake"}]},
    }))
    port = _port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAYGATE_ADMIN_KEY": ADMIN}
    proc = subprocess.Popen([sys.executable, "-m", "raygate.cli", "gateway", "--config", str(cfg), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(timeout=30) as c:
            for _ in range(300):
                try:
                    if c.get(base + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            admin = {"authorization": f"Bearer {ADMIN}"}
            keys = {
                "no quota": c.post(base + "/admin/keys", headers=admin, json={"name": "free"}).json()["key"],
                "redis quota": c.post(base + "/admin/keys", headers=admin, json={
                    "name": "limited",
                    "limits": {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "tokens_per_day": 10**12},
                }).json()["key"],
            }
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            lat: dict[str, list[float]] = {k: [] for k in keys}
            for i in range(a.requests * 2 + 200):
                name = list(keys)[i % 2]
                t0 = time.perf_counter()
                r = c.post(base + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {keys[name]}"})
                dt = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                if i >= 200:  # warm-up
                    lat[name].append(dt * 1000)
    finally:
        proc.terminate()
        proc.wait(30)
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    result = {
        "requests_per_key": a.requests,
        "p50_ms": {k: round(v, 3) for k, v in p50.items()},
        "p90_ms": {k: round(statistics.quantiles(v, n=10)[-1], 3) for k, v in lat.items()},
        "added_p50_ms": round(p50["redis quota"] - p50["no quota"], 3),
    }
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md = (
        "| key | p50 (ms) | p90 (ms) |\n|---|---|---|\n"
        + "".join(f"| {k} | {result['p50_ms'][k]} | {result['p90_ms'][k]} |\n" for k in keys)
        + f"\nRedis quota check adds **{result['added_p50_ms']} ms** at p50 (target <= 0.5 ms).\n"
    )
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
