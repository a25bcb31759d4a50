"""vLLM's engine-core process killed under the shared stack: while it is gone every request is a 503 envelope
with Retry-After (never a 500, never a hang) and `/ready` says so; Serve restarts the replica and the model
answers again. Last in file order: the stack the other tests share ends this test healthy again."""

from __future__ import annotations

import time

import httpx
import psutil

from tests.integration.conftest import LiveStack

MSG = [{"role": "user", "content": "Say something."}]


def _engine_cores() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        title = f"{p.info['name']} {' '.join(p.info['cmdline'] or [])}"
        if "EngineCore" in title:
            out.append(p)
    return out


def test_a_killed_engine_is_a_503_then_the_replica_comes_back(stack: LiveStack) -> None:
    auth = {"authorization": f"Bearer {stack.key}"}
    body = {"model": stack.model, "messages": MSG, "max_tokens": 2}
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:
        assert c.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
        cores = _engine_cores()
        assert cores, "no vLLM engine-core process found"
        for p in cores:
            p.kill()
        killed_at = time.monotonic()
        seen: dict[str, int] = {}
        ready_503 = False
        recovered_at = None
        while time.monotonic() - killed_at < 300:
            t0 = time.monotonic()
            try:
                r = c.post("/v1/chat/completions", json=body, headers=auth)
                outcome = str(r.status_code)
                if r.status_code == 503:
                    outcome += " " + r.json()["error"]["code"]
                    assert int(r.headers["retry-after"]) >= 1
            except httpx.TransportError as exc:  # refused until `raygate up`'s standby sees no replica listens
                outcome = type(exc).__name__
                assert time.monotonic() - t0 < 10, f"{outcome} after {time.monotonic() - t0:.0f} s"
            seen[outcome] = seen.get(outcome, 0) + 1
            try:
                ready_503 = ready_503 or c.get("/ready", timeout=10).status_code == 503
            except httpx.TransportError:
                pass
            if outcome == "200" and len(seen) > 1:
                recovered_at = time.monotonic()
                break
            time.sleep(0.5)
    print(f"engine killed: {seen}; answering again after {(recovered_at or time.monotonic()) - killed_at:.0f} s")
    assert recovered_at is not None, seen
    assert all(o == "200" or o.startswith("503 ") or o in ("ConnectError", "RemoteProtocolError") for o in seen), seen
    assert any(o.startswith("503 ") for o in seen) and ready_503, seen
    # While Serve starts the replacement replica the port answers 503 `no_replica` (raygate/standby.py): a refused
    # connection only in the moment before the standby's next look.
    assert seen.get("ConnectError", 0) <= 2, seen
