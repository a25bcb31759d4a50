"""`raygate up` as a user runs it: prints a working key, serves, and SIGTERM leaves no Ray process.

Runs before the session stack starts (file order): a stack with conversation routing on (Serve's
HAProxy in front) would contend with another for HAProxy's fixed stats/metrics ports.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from raygate.leftovers import stop_leftovers
from raygate.stack import is_ray_daemon
from tests.support import EAGER, free_ports, wait_until

pytestmark = pytest.mark.integration
PORT, DASHBOARD_PORT, METRICS_PORT = free_ports(3)


def _ray_processes() -> set[int]:
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in cmd or "gcs_server" in cmd or cmd.startswith("ray::"):
            out.add(p.pid)
    return out


def _listeners(port: int) -> list[str]:
    """The command lines of the processes listening on `port` (one that dies meanwhile is left out)."""
    out = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            with contextlib.suppress(psutil.Error):  # a killed replica is a zombie for a moment
                out.append(" ".join(psutil.Process(conn.pid).cmdline()))
    return out


def _config(path: Path, key: str, *, gateway: dict | None = None, settings: dict | None = None,
            fake: dict | None = None) -> Path:
    """A config serving the tiny model on the fake engine that accepts `key`."""
    model = {"model": "raygate/tiny-chat@1", "engine": "fake", **({"fake": fake} if fake else {})}
    path.write_text(yaml.safe_dump({"gateway": {**(gateway or {}), "settings": {"api_keys": [key], **(settings or {})}},
                                    "serve": {"models": [model]}}))
    return path


def _up_fails(tmp_path: Path, config: Path) -> str:
    """`raygate up --config config` run to its end, which must be a failure; what it printed."""
    exe = Path(sys.executable).with_name("raygate")
    proc = subprocess.run(
        [str(exe), "--home", str(tmp_path), "up", "--config", str(config), "--port", str(PORT),
         "--dashboard-port", str(DASHBOARD_PORT), "--metrics-port", str(METRICS_PORT)],
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    return out


def _start_up(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """`raygate up *args` on this file's ports; the process and what it printed until it was up (or ended)."""
    exe = Path(sys.executable).with_name("raygate")
    proc = subprocess.Popen(
        [str(exe), "--home", str(tmp_path), "up", *args, "--port", str(PORT),
         "--dashboard-port", str(DASHBOARD_PORT), "--metrics-port", str(METRICS_PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    return proc, "".join(lines)


def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    before = _ray_processes()
    exe = Path(sys.executable).with_name("raygate")
    proc, text = _start_up(tmp_path, "--engine", "fake")
    try:
        assert "raygate is up" in text, text
        key = re.search(r"API key\s+(\S+)", text).group(1)
        assert key == (tmp_path / "dev-key").read_text().strip()
        assert f"http://127.0.0.1:{PORT}/v1" in text and "raygate/tiny-chat (raygate/tiny-chat@1)" in text
        client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{PORT}/v1", max_retries=0)
        resp = client.chat.completions.create(model="raygate/tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3)
        assert resp.usage.completion_tokens == 3
        listing = subprocess.run([str(exe), "--home", str(tmp_path), "models", "list"], capture_output=True, text=True)
        assert "raygate/tiny-chat@1" in listing.stdout and "stable" in listing.stdout
        status = subprocess.run([str(exe), "status", "--dashboard-port", str(DASHBOARD_PORT)],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert "deployment gateway: HEALTHY" in status.stdout, status.stdout
        assert "engine raygate/tiny-chat@1: variant full, running 0, healthy" in status.stdout, status.stdout
        assert f"http://127.0.0.1:{DASHBOARD_PORT}" in status.stdout
        # The replica pools its metrics in a folder of this cluster's own (another stack on the host has another).
        (replica,) = {c.pid for c in psutil.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == PORT and c.pid}
        pooled = Path(psutil.Process(replica).environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert pooled.name == "raygate" and pooled.parent.parent.name == "raygate-metrics", pooled
        assert len(pooled.parent.name) > 20 and any(pooled.iterdir()), pooled  # named by a Ray node id; in use
    finally:
        stop_started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        stop_s = time.monotonic() - stop_started
    assert rc == 0, text + (proc.stdout.read() if proc.stdout else "")
    # Serve's replicas would stay reachable 30 s for load balancers (raygate.stack.SERVE_ENV shortens it).
    assert stop_s < 20, f"SIGTERM took {stop_s:.0f} s to stop the stack"
    deadline = time.monotonic() + 30
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not (_ray_processes() - before), "Ray processes left behind"
    assert not pooled.parent.exists()  # the stop removes the cluster's metrics folder


def test_sigterm_drains_the_replica_listening_itself(tmp_path: Path) -> None:
    """On one node the gateway replica is the only listener on the port (no proxy). SIGTERM: streams in
    flight finish whole; new connections are refused once the replica stops listening, never accepted and cut."""
    key = "sk-drain-test-0123456789"
    config = _config(tmp_path / "raygate.yaml", key, fake={"itl_ms": 20})
    proc, text = _start_up(tmp_path, "--config", str(config))
    base = f"http://127.0.0.1:{PORT}"
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "raygate/tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
            "stream": True}
    first_chunk = threading.Event()
    stream: dict[str, object] = {}

    def read_stream() -> None:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            stream["status"] = r.status_code
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()
            stream["events"] = events

    try:
        assert "raygate is up" in text, text
        listeners = _listeners(PORT)
        assert listeners and all("ServeReplica" in cmd for cmd in listeners), listeners
        assert not [p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"]
        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first_chunk.wait(30), stream
        proc.send_signal(signal.SIGTERM)
        late: list[str] = []

        def refused() -> bool:
            try:
                r = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=30,
                               json={**body, "stream": False, "max_tokens": 5})
            except httpx.ConnectError:
                return True
            except httpx.RemoteProtocolError as exc:  # connected as the listener closed: no answer, no work
                assert "without sending a response" in str(exc), exc
                return True
            late.append(f"{r.status_code} {r.text[:80]}")
            return False

        assert wait_until(refused, 15, every_s=0.2), late
        assert reader.is_alive(), "the stream ended before the replica stopped listening: the test proves nothing"
        reader.join(60)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert stream["status"] == 200
    events = stream["events"]
    assert isinstance(events, list) and events[-1] == "[DONE]", events[-3:]
    assert sum(1 for e in events if '"content"' in e) >= 400
    # Requests that got through before the listener closed were answered whole.
    assert all(line.startswith("200 ") or line.startswith("503 ") for line in late), late


def _has_replica(pid: int) -> bool:
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "ServeReplica" in " ".join(p.cmdline()):
                return True
        except psutil.Error:
            pass
    return False


def test_ctrl_c_while_the_engine_starts_stops_at_once(tmp_path: Path) -> None:
    """An engine that takes ten minutes to start: Ctrl-C during that start stops everything within
    the shutdown's own time, not after the engine is up."""
    before = _ray_processes()
    config = tmp_path / "slow.yaml"
    config.write_text(
        "serve:\n  models:\n    - model: raygate/tiny-chat@1\n      engine: fake\n      fake:\n        start_s: 600\n"
    )
    exe = Path(sys.executable).with_name("raygate")
    proc = subprocess.Popen(
        [str(exe), "--home", str(tmp_path), "up", "--config", str(config), "--port", str(PORT),
         "--dashboard-port", str(DASHBOARD_PORT), "--metrics-port", str(METRICS_PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _has_replica(proc.pid):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
        time.sleep(2)  # inside the replica's (slow) engine start now
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read() if proc.stdout else ""
    assert rc == 130, out
    assert "raygate is up" not in out and "raygate: stopped." in out, out
    deadline = time.monotonic() + 30
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not (_ray_processes() - before), "Ray processes left behind"


def test_an_engine_that_cannot_start_fails_up_with_its_reason(tmp_path: Path) -> None:
    before = _ray_processes()
    config = tmp_path / "broken.yaml"
    config.write_text(
        "serve:\n  models:\n    - model: raygate/tiny-chat@1\n      engine: fake\n      fake:\n"
        "        start_error: weights are missing\n"
    )
    out = _up_fails(tmp_path, config)
    assert "failed to deploy" in out and "weights are missing" in out, out[-3000:]
    deadline = time.monotonic() + 30
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not (_ray_processes() - before), "Ray processes left behind"


def _load(url: str, body: dict, key: str, stop: threading.Event, answers: list[tuple[float, float, str]],
          timeout_s: float = 30) -> None:
    """POST `body` until `stop`, appending (start, end, status or error name) per request. A new connection per
    request, as a fresh client opens one: a pooled connection to a killed replica is the in-flight case."""
    with httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = c.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
                outcome = f"{r.status_code} retry-after {r.headers['retry-after']}" if r.status_code == 503 \
                    else str(r.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            answers.append((t0, time.monotonic(), outcome))
            if outcome.startswith("ConnectError"):
                time.sleep(0.05)  # refused at once: a client backs off a little before the next try


def _kill_under_load(loaders: list[threading.Thread], stop: threading.Event, victim: int,
                     recovered: Callable[[float], bool]) -> tuple[float, bool, float]:
    """Start `loaders`; 2 s in, SIGKILL `victim`; wait (up to 120 s) until `recovered(when it was gone)`, then 2 s
    more; stop the load. When the victim was gone, whether it recovered, and how long that took."""
    for t in loaders:
        t.start()
    time.sleep(2)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: not psutil.pid_exists(victim), 10, every_s=0.02)
    gone_at = time.monotonic()
    recovered_ok = wait_until(lambda: recovered(gone_at), 120, every_s=0.2)
    took_s = time.monotonic() - gone_at
    time.sleep(2)
    stop.set()
    for t in loaders:
        t.join(60)
    return gone_at, recovered_ok, took_s


def test_a_killed_replica_of_two_loses_no_new_request(tmp_path: Path, private_redis) -> None:  # noqa: ANN001
    """Two gateway replicas share the port. SIGKILL one under load: what it held fails, every request that
    starts after it is gone is answered by the other, and Serve brings a second listener back."""
    key = "sk-kill-test-0123456789ab"
    config = _config(tmp_path / "raygate.yaml", key, gateway={"num_replicas": 2},
                     settings={"redis_url": private_redis.url}, fake={"itl_ms": 5})
    proc, text = _start_up(tmp_path, "--config", str(config))
    base = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    body = {"model": "raygate/tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    answers: list[tuple[float, float, str]] = []  # (start, end, status or error)
    stop = threading.Event()

    def load() -> None:
        _load(base, body, key, stop, answers)

    try:
        assert "raygate is up" in text, text
        assert wait_until(lambda: len(_listeners(PORT)) == 2, 60, every_s=0.5), _listeners(PORT)
        victim = next(c.pid for c in psutil.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == PORT and c.pid)
        loaders = [threading.Thread(target=load) for _ in range(4)]
        gone_at, back, back_after_s = _kill_under_load(loaders, stop, victim, lambda _: len(_listeners(PORT)) == 2)
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    after = [a for a in answers if a[0] > gone_at]
    outcomes: dict[str, int] = {}
    for *_, outcome in answers:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"requests: {len(answers)} {outcomes}; after the kill: {len(after)}; "
          f"second listener back after {back_after_s:.1f} s")
    assert len(after) > 20 and all(outcome == "200" for _, _, outcome in after), sorted({o for *_, o in after})
    assert all(outcome == "200" for t0, end, outcome in answers if end < gone_at - 0.5)
    assert back, "Serve did not bring the killed replica back"


def test_the_only_replica_killed_gives_503s_with_retry_after_until_one_is_back(tmp_path: Path) -> None:
    """One gateway replica (the default), SIGKILLed under load: what it held fails; while no replica listens,
    every new request gets a 503 envelope with Retry-After at once (never a hang); answers resume as soon as
    Serve's replacement listens. The outage is measured and bounded."""
    key = "sk-kill-one-0123456789ab"
    config = _config(tmp_path / "raygate.yaml", key, fake={"itl_ms": 5})
    proc, text = _start_up(tmp_path, "--config", str(config))
    body = {"model": "raygate/tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    answers: list[tuple[float, float, str]] = []
    stop = threading.Event()
    try:
        assert "raygate is up" in text, text
        replica = [c.pid for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == PORT and c.pid]
        assert len(replica) == 1, replica
        loaders = [threading.Thread(target=_load, args=(f"http://127.0.0.1:{PORT}/v1/chat/completions", body, key,
                                                        stop, answers, 10)) for _ in range(4)]
        gone_at, answering, _ = _kill_under_load(
            loaders, stop, replica[0], lambda gone: any(t0 > gone and o == "200" for t0, _, o in list(answers)))
        assert answering
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    after = [(t0, end, o) for t0, end, o in answers if t0 > gone_at]
    first_200 = min(t0 for t0, _, o in after if o == "200")
    outage = [(t0, end, o) for t0, end, o in after if t0 < first_200]
    kinds: dict[str, int] = {}
    for *_, o in outage:
        kinds[o] = kinds.get(o, 0) + 1
    refused_s = max((t0 - gone_at for t0, _, o in outage if o == "ConnectError"), default=0.0)
    print(f"outage {first_200 - gone_at:.1f} s: {kinds}; refused until {refused_s:.2f} s after the kill; "
          f"longest answer during it {max((e - t0 for t0, e, _ in outage), default=0):.3f} s")
    assert first_200 - gone_at < 60
    assert kinds.get("503 retry-after 2", 0) > 10, kinds
    assert set(kinds) <= {"503 retry-after 2", "ConnectError"}, kinds  # no hang (ReadTimeout), no 500
    assert refused_s < 1.0  # refused only until `raygate up` sees that nothing listens
    assert all(end - t0 < 1.0 for t0, end, _ in outage)  # fast answers, not a wait for the replacement
    assert all(o == "200" for t0, _, o in after if t0 > first_200 + 1)


def test_a_killed_up_is_cleaned_up_by_the_next_start(tmp_path: Path) -> None:
    """kill -9 on `raygate up` leaves Ray's agents running with the metrics port; the next `raygate up` with the
    same home stops them (they are provably its own: recorded with their start times) and serves."""
    before = _ray_processes()
    key = "sk-kill-up-0123456789abcd"
    config = _config(tmp_path / "raygate.yaml", key)
    proc, text = _start_up(tmp_path, "--config", str(config))
    try:
        assert "raygate is up" in text, text
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not _listeners(PORT), 30, every_s=0.2)  # the replica died with the raylet
        left = _ray_processes() - before
        assert left, "nothing was left behind: the test proves nothing"
        proc, text = _start_up(tmp_path, "--config", str(config))
        assert "raygate is up" in text, text
        assert "stopped what a killed raygate up left running" in text, text
        assert not {pid for pid in left if psutil.pid_exists(pid)}
        r = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "raygate/tiny-chat", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        stop_leftovers(tmp_path / "stacks")  # whatever a failure above left: the next tests need these ports
    assert rc == 0
    assert not (_ray_processes() - before) and not _held_ports()  # the stop waits for its processes


def _haproxies() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"]


def _held_ports() -> set[int]:
    ours = {PORT, DASHBOARD_PORT, METRICS_PORT, 8404, 9101}  # 8404, 9101: HAProxy's stats and metrics
    return {c.laddr.port for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ours}


def test_five_starts_and_stops_leave_nothing(tmp_path: Path) -> None:
    """Five `raygate up` cycles as an operator runs them: SIGTERM, Ctrl-C, a second Ctrl-C during the stop, and
    one with HAProxy in front (conversation routing) whose replica is killed so HAProxy reloads. After each
    stop no process it started is alive, no port it bound is held, and the stop took at most 15 s."""
    key = "sk-cycle-test-0123456789a"
    plain = _config(tmp_path / "plain.yaml", key)
    routed = _config(tmp_path / "routed.yaml", key, gateway={"conversation_routing": {"enabled": True}})
    body = {"model": "raygate/tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    def answers() -> bool:
        try:
            return httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=10,
                              headers={"Authorization": f"Bearer {key}"}).status_code == 200
        except httpx.HTTPError:
            return False

    before = _ray_processes()
    stops = []
    for cycle, (config, signals) in enumerate([
        (plain, [signal.SIGTERM]), (routed, [signal.SIGINT]), (plain, [signal.SIGINT, signal.SIGINT]),
        (plain, [signal.SIGTERM]), (plain, [signal.SIGINT]),
    ]):
        proc, text = _start_up(tmp_path, "--config", str(config))
        try:
            assert "raygate is up" in text, text
            assert answers()
            if config == routed:  # a replica restart: Serve reloads HAProxy, a new generation of it
                assert _haproxies()
                replica = next(p for p in psutil.process_iter(["cmdline"])
                               if "ray::ServeReplica:raygate:gateway" in (p.info["cmdline"] or [])[:1])
                replica.kill()
                assert wait_until(answers, 90, every_s=0.5), "no answer after the replica restart"
            t0 = time.monotonic()
            for sig in signals:
                proc.send_signal(sig)
                time.sleep(0.5)
            rc = proc.wait(timeout=120)
            stops.append(time.monotonic() - t0)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert rc in (0, 130), (cycle, rc)
        # The processes a stop ends exit by themselves a moment later (Ray's own shutdown), ports with them.
        assert wait_until(lambda: not (_ray_processes() - before) and not _haproxies() and not _held_ports(), 15,
                          every_s=0.2), (cycle, _ray_processes() - before, _haproxies(), _held_ports())
    print("stop seconds per cycle:", [round(s, 1) for s in stops])
    assert max(stops) <= 15, stops


def test_an_unreachable_database_fails_up_naming_it_without_the_password(tmp_path: Path) -> None:
    before = _ray_processes()
    url = f"postgresql+psycopg://ana:s3cret-pass@127.0.0.1:{free_ports(1)[0]}/keys"
    config = _config(tmp_path / "raygate.yaml", "sk-db-down-0123456789abc",
                     settings={"database_url": url, "key_secret": "k" * 32})
    out = _up_fails(tmp_path, config)
    assert "cannot open the key store at postgresql+psycopg://ana:***@127.0.0.1:" in out, out[-3000:]
    assert "s3cret-pass" not in out
    assert wait_until(lambda: not (_ray_processes() - before), 30, every_s=1), "Ray processes left behind"


def test_ray_daemons_keep_off_the_cores_vllm_s_cpu_worker_computes_on(tmp_path: Path) -> None:
    """One vLLM engine on this host's CPUs: vLLM binds its worker to cores of its own and leaves the rest to its
    engine core; `raygate up` keeps Ray's daemons on that rest, and leaves the raylet and the replica where the
    replica's own processes may go."""
    cores = set(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("vLLM's CPU worker leaves no core to the rest on a one-core host")
    key = "sk-placement-0123456789"
    config = tmp_path / "vllm.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"settings": {"api_keys": [key]}}, "serve": {"models": [
        {"model": "raygate/tiny-chat@1", "engine": "vllm", "engine_kwargs": {**EAGER, "max_model_len": 1024}}]}}))
    proc, text = _start_up(tmp_path, "--config", str(config))
    try:
        assert "raygate is up" in text, text
        stack = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in stack if p.name().startswith("VLLM::Worker")]
        assert workers, "no vLLM worker process under raygate up"
        bound = set().union(*(w.cpu_affinity() for w in workers))
        assert bound < cores, f"vLLM's CPU binding left no core: {bound}"
        daemons = [p for p in stack if is_ray_daemon(p.cmdline())]
        masks = {f"{p.pid} {' '.join(p.cmdline())[:120]}": {frozenset(os.sched_getaffinity(t.id)) for t in p.threads()}
                 for p in daemons}
        assert any("gcs_server" in name for name in masks) and any("ServeController" in name for name in masks)
        assert all(m == {frozenset(cores - bound)} for m in masks.values()), (bound, masks)
        raylet = next(p for p in stack if "raylet/raylet" in " ".join(p.cmdline()))
        replica = next(p for p in stack if "ServeReplica" in " ".join(p.cmdline()))
        assert set(raylet.cpu_affinity()) == cores, "the raylet's workers inherit its mask: it stays everywhere"
        assert set(replica.cpu_affinity()) == cores
        client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{PORT}/v1", max_retries=0)
        resp = client.chat.completions.create(model="raygate/tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3)
        assert resp.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    assert rc == 0
