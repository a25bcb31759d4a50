"""raygate on a two-node Ray cluster, deployed as an operator deploys it (`serve deploy`), each node a host.

The head runs in this network namespace, the worker node in one of its own (tests/integration/netns_cluster.py):
separate addresses, Ray temp dirs and resources, joined with `ray start --address`. The Serve config is the one
`deploy/serve_config.yaml` shows, with two gateway replicas (one per node, each with a co-located model) and a
model in a deployment of its own (`tiny-chat-remote`) on the worker node, placed there by a custom resource only
that node offers. Both models run raygate's deterministic engine: what is under test here is the cluster
(placement, ingress, quotas, a node's death), and vLLM in a replica, co-located or in a deployment of its own, is
tested on one node elsewhere (test_deployment_placement, the session stack); a vLLM engine starting twice on a
one-CPU node would take minutes of the module for nothing it checks. Every node runs Serve's ingress on the same
port. Quotas are in a Redis both nodes reach over the veth pair; keys in the gateway's SQLite store on the shared
disk.

What it shows: replicas on both nodes and the model on the worker (Ray's state API and `raygate status
--address`); the OpenAI API through either node's ingress; a key's rpm exact across nodes (50 requests
released at once through both ingresses against rpm 10: exactly 10 admitted); Ray's metrics on each node's
export port; the worker node killed under load (streams there end in an error, never a silent cut; new
requests succeed through the head; the model left without a replica refused at once with 503) and the model's
deployment back when the node rejoins.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.integration.netns_cluster import NetnsCluster
from tests.support import PrivateRedis, free_ports, wait_until

pytestmark = pytest.mark.integration

GCS_PORT, DASHBOARD_PORT, METRICS_HEAD, METRICS_WORKER, PORT = free_ports(5)
ADMIN = "rg-admin-multinode-0123456789abcdef"
DEV_KEY = "rg-dev-multinode-0123456789abcdefgh"
LOCAL, REMOTE = "raygate/tiny-chat", "tiny-chat-remote"
APP, GATEWAY, REMOTE_DEP = "raygate", "gateway", "tiny-chat-remote@stable"


@dataclass
class _Cluster:
    nodes: NetnsCluster
    home: Path
    auth: dict[str, str]

    def url(self, ip: str) -> str:
        return f"http://{ip}:{PORT}"

    @property
    def head(self) -> str:
        return self.url(self.nodes.head_ip)

    @property
    def worker(self) -> str:
        return self.url(self.nodes.worker_ip)

    def deployments(self) -> dict[str, Any]:
        """Serve's view from the head's dashboard: each deployment's status and replicas (with their node)."""
        r = httpx.get(f"http://{self.nodes.head_ip}:{DASHBOARD_PORT}/api/serve/applications/", timeout=30,
                      headers=self.auth)
        r.raise_for_status()
        apps = r.json().get("applications", {})
        return apps.get(APP, {}).get("deployments", {}) if apps else {}

    def replica_nodes(self, deployment: str) -> list[str]:
        replicas = self.deployments().get(deployment, {}).get("replicas", [])
        return sorted(r["node_ip"] for r in replicas if r.get("state") == "RUNNING")


def _serve_config(home: Path, redis_url: str) -> dict[str, Any]:
    paced = {"ttft_ms": 20, "itl_ms": 10}  # raygate's deterministic engine, paced like a small model: 400 tokens, 4 s
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": PORT},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "gateway.builder:build_app",
            "args": {"config": {
                "gateway": {
                    "num_replicas": 2, "num_cpus": 1,  # the node's one CPU: one replica a node
                    "settings": {"home": str(home), "api_keys": [DEV_KEY], "admin_key": ADMIN, "redis_url": redis_url,
                                 "key_secret": "multinode-secret-0123456789abcdef"},
                },
                "serve": {"registry": str(home / "registry"), "models": [
                    {"model": "raygate/tiny-chat@stable", "engine": "fake", "num_cpus": 0, "fake": paced},
                    {"model": "raygate/tiny-chat@stable", "served_name": REMOTE, "engine": "fake", "fake": paced,
                     "placement": "deployment", "num_cpus": 0, "resources": {"rg_worker": 0.1}},
                ]},
            }},
        }],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Cluster]:
    why = NetnsCluster.available()
    if why is not None:
        pytest.skip(f"no network namespaces here ({why}); Ray's multi-raylet test cluster is the fallback")
    from raygate import home as home_mod

    workdir = tmp_path_factory.mktemp("multinode")
    home = workdir / "home"
    home_mod.ensure_default_model(home_mod.registry(home))
    nodes = NetnsCluster(GCS_PORT, DASHBOARD_PORT, (METRICS_HEAD, METRICS_WORKER))
    redis = PrivateRedis(workdir, host="0.0.0.0")
    try:
        nodes.create_network()
        redis.start()
        nodes.start_head()
        nodes.start_worker()
        config = workdir / "serve.yaml"
        config.write_text(yaml.safe_dump(_serve_config(home, f"redis://{nodes.head_ip}:{redis.port}/0")))
        deploy = subprocess.run(
            [str(Path(sys.executable).with_name("serve")), "deploy", str(config), "-a",
             f"http://{nodes.head_ip}:{DASHBOARD_PORT}"],
            env=nodes.env, capture_output=True, text=True, timeout=120)
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        up = _Cluster(nodes, home, nodes.auth_header())

        def running() -> bool:
            deps = up.deployments()
            return bool(deps) and all(d.get("status") == "HEALTHY" for d in deps.values()) and \
                len(up.replica_nodes(GATEWAY)) == 2

        assert wait_until(running, 600, every_s=2), up.deployments()
        assert wait_until(lambda: _ready(up.head) and _ready(up.worker), 120, every_s=1)
        yield up
    finally:
        nodes.stop()
        redis.stop()


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _chat(base: str, key: str, model: str, max_tokens: int = 4, timeout_s: float = 120) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=timeout_s,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})


def test_the_gateway_runs_on_both_nodes_and_the_model_on_the_worker(cluster: _Cluster) -> None:
    nodes = cluster.nodes
    assert cluster.replica_nodes(GATEWAY) == sorted([nodes.head_ip, nodes.worker_ip])
    assert cluster.replica_nodes(REMOTE_DEP) == [nodes.worker_ip]
    for base in (cluster.head, cluster.worker):  # either node's ingress serves both models
        client = openai.OpenAI(api_key=DEV_KEY, base_url=base + "/v1", max_retries=0, _strict_response_validation=True)
        assert {m.id for m in client.models.list().data} == {LOCAL, REMOTE}
        for model in (LOCAL, REMOTE):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0)
            assert reply.usage is not None and reply.usage.completion_tokens == 4
    # --address names the cluster even where RAY_ADDRESS names another (a shell that joined another cluster).
    status = subprocess.run(
        [str(Path(sys.executable).with_name("raygate")), "status", "--address", nodes.address],
        capture_output=True, text=True, timeout=120, env={**nodes.env, "RAY_ADDRESS": "127.0.0.1:1"})
    assert status.returncode == 0, status.stderr[-2000:]
    out = status.stdout
    assert f"node {nodes.head_ip}: alive, 1 CPU" in out and f"node {nodes.worker_ip}: alive, 1 CPU, rg_worker" in out, out
    assert f"deployment {GATEWAY}: HEALTHY  replicas: RUNNING=2  on {nodes.head_ip}, {nodes.worker_ip}" in out \
        or f"on {nodes.worker_ip}, {nodes.head_ip}" in out, out
    assert f"deployment {REMOTE_DEP}: HEALTHY  replicas: RUNNING=1  on {nodes.worker_ip}" in out, out


def test_a_keys_rpm_holds_exactly_across_both_nodes_ingress(cluster: _Cluster) -> None:
    created = httpx.post(cluster.head + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30,
                         json={"name": "barrier", "limits": {"rpm": 10}})
    assert created.status_code in (200, 201), created.text
    key = created.json()["key"]
    gate = threading.Barrier(50)
    codes: list[int] = []

    def one(base: str) -> None:
        gate.wait()
        codes.append(_chat(base, key, LOCAL, max_tokens=1).status_code)

    threads = [threading.Thread(target=one, args=(cluster.head if i % 2 else cluster.worker,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(codes) == [200] * 10 + [429] * 40, {c: codes.count(c) for c in set(codes)}


def test_each_node_exports_its_own_ray_and_serve_metrics(cluster: _Cluster) -> None:
    nodes = cluster.nodes

    def metrics(ip: str, port: int) -> str:
        return httpx.get(f"http://{ip}:{port}/metrics", timeout=30).text

    def remote(export: str) -> bool:  # what the remote model's replica counted (a caller's handle has other series)
        return any(line.startswith("ray_serve_deployment_request_counter") and f'deployment="{REMOTE_DEP}"' in line
                   for line in export.splitlines())

    def exported() -> bool:
        return remote(metrics(nodes.worker_ip, METRICS_WORKER))

    assert _chat(cluster.head, DEV_KEY, REMOTE).status_code == 200
    assert wait_until(exported, 60, every_s=2), "the worker node's export has no series of the remote model's replica"
    head = metrics(nodes.head_ip, METRICS_HEAD)
    assert "ray_serve_" in head and not remote(head)  # the remote model's replica lives on the worker
    for base in (cluster.head, cluster.worker):  # the gateway's own metrics, through each node's ingress
        own = httpx.get(base + "/metrics", timeout=30, headers={"authorization": f"Bearer {ADMIN}"})
        assert own.status_code == 200 and "raygate_requests_total" in own.text


def test_the_worker_node_dies_under_load_and_its_model_comes_back_with_it(cluster: _Cluster) -> None:
    nodes = cluster.nodes
    outcomes: list[tuple[float, str]] = []  # (start time, outcome) of every streamed request through the head
    stop = threading.Event()

    def stream_forever() -> None:
        body = {"model": LOCAL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 400,
                "min_tokens": 400, "stream": True}
        with httpx.Client(base_url=cluster.head, timeout=120, headers={"authorization": f"Bearer {DEV_KEY}"}) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        text = "".join(r.iter_text())
                    if r.status_code != 200:  # with what it said, to tell who answered (a replica, HAProxy)
                        outcomes.append((started, f"status {r.status_code} {text[:160]!r}"))
                    elif text.rstrip().endswith("data: [DONE]"):
                        outcomes.append((started, "done"))
                    elif '"error"' in text:
                        outcomes.append((started, "error event"))
                    else:
                        outcomes.append((started, "cut"))
                except httpx.HTTPError as exc:
                    outcomes.append((started, type(exc).__name__))

    workers = [threading.Thread(target=stream_forever, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    assert wait_until(lambda: sum(1 for _, o in outcomes if o == "done") >= 4, 120), outcomes
    killed_at = time.monotonic()
    assert nodes.kill_worker() > 0
    # New requests succeed through the head: its own gateway replica serves them (HAProxy retries a refused
    # connection on the other replica; Serve drops the dead node's replicas once Ray sees the node gone).
    settle_s = 10
    assert wait_until(lambda: sum(1 for t, o in outcomes if t > killed_at + settle_s and o == "done") >= 8, 180), \
        outcomes
    stop.set()
    for w in workers:
        w.join(150)
    timeline = [(round(t - killed_at, 1), o) for t, o in sorted(outcomes) if t > killed_at - 5]
    print(f"requests around the kill (start s after it, outcome): {timeline}")
    after = [o for t, o in outcomes if t > killed_at + settle_s]
    assert set(after) == {"done"}, timeline
    # No stream was cut silently: each ended with [DONE] or said why it failed.
    assert "cut" not in {o for _, o in outcomes}, outcomes
    # The remote model's only node is gone: once the gateway's poll of its deployment goes unanswered (seconds),
    # its requests are refused at once with the envelope and Retry-After, not queued until the node returns.
    def refused_at_once() -> bool:
        try:
            r = _chat(cluster.head, DEV_KEY, REMOTE, timeout_s=5)
        except httpx.TimeoutException:
            return False
        return r.status_code == 503 and "retry-after" in r.headers and \
            set(r.json()["error"]) == {"message", "type", "param", "code"}

    assert wait_until(refused_at_once, 60, every_s=1)

    nodes.start_worker()  # the node rejoins: Serve puts the model's replica (and the second gateway replica) back
    assert wait_until(lambda: cluster.replica_nodes(REMOTE_DEP) == [nodes.worker_ip], 600, every_s=2), \
        cluster.deployments()
    assert wait_until(lambda: _chat(cluster.head, DEV_KEY, REMOTE).status_code == 200, 120, every_s=2)
    assert wait_until(lambda: len(cluster.replica_nodes(GATEWAY)) == 2, 300, every_s=2), cluster.deployments()
