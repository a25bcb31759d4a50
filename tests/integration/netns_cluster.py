"""A two-node Ray cluster on this machine, each node a host of its own: the worker in a network namespace.

The head runs in this namespace on one end of a veth pair, the worker node in a namespace of its own on the
other end, each with its own address, Ray temp dir, logical CPUs and resources: what crosses between them
crosses a network, as between two machines. Both are started as an operator starts a cluster (`ray start
--head`, `ray start --address`), with the environment raygate's clusters run with (raygate.stack.SERVE_ENV).
Every process either node started is found by the node's temp dir (the head) or its namespace (the worker),
so stopping this cluster never touches another Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from raygate.stack import reap, stack_env
from tests.support import free_ports


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsCluster:
    """A Ray head here and a Ray worker node in a network namespace, joined by a veth pair."""

    def __init__(self, gcs_port: int, dashboard_port: int, metrics_ports: tuple[int, int]) -> None:
        tag = os.getpid() % 10_000
        self.ns, self.host_if, self.peer_if = f"rg{tag}", f"rgh{tag}", f"rgp{tag}"
        subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.head_ip, self.worker_ip = f"{subnet}.1", f"{subnet}.2"
        # Ray's temp dirs: a short path of their own, as Unix socket paths inside them must stay under 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="rgmn", dir="/tmp"))
        self.gcs_port, self.dashboard_port, self.metrics_ports = gcs_port, dashboard_port, metrics_ports
        # Token authentication on every node, as on any cluster reachable over a network: a token of the
        # cluster's own in every node's environment (on separate machines, in each one's RAY_AUTH_TOKEN or token
        # file), never the ~/.ray/auth_token a local Ray left on this machine, or none on a fresh one.
        # Not RAY_ADDRESS: a Ray this test process joined (the shared stack) would win over --address.
        inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env = {**inherited, **stack_env(replicas_listen=False), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    # HAProxy's own metrics and stats ports on the head: free ones, beside any other stack here.
                    **dict(zip(("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"),
                               map(str, free_ports(2)), strict=True))}
        self.ray = str(Path(sys.executable).with_name("ray"))

    def auth_header(self) -> dict[str, str]:
        """The header the dashboard's HTTP API wants."""
        return {"authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @staticmethod
    def available() -> str | None:
        """Why this machine cannot make network namespaces, or None if it can."""
        if shutil.which("ip") is None:
            return "iproute2 is not installed"
        probe = f"rgprobe{os.getpid() % 10_000}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def create_network(self) -> None:
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        _ip("link", "set", self.peer_if, "netns", self.ns)
        _ip("addr", "add", f"{self.head_ip}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (("addr", "add", f"{self.worker_ip}/24", "dev", self.peer_if), ("link", "set", self.peer_if, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", self.ns, "ip", *args)

    def start_head(self) -> None:
        self._ray_start([
            "--head", "--node-ip-address", self.head_ip, "--port", str(self.gcs_port), "--num-cpus", "1",
            "--temp-dir", str(self.workdir / "head"), "--dashboard-host", "0.0.0.0",
            "--dashboard-port", str(self.dashboard_port), "--metrics-export-port", str(self.metrics_ports[0]),
            "--object-store-memory", str(200 << 20), "--disable-usage-stats",
        ])

    def start_worker(self) -> None:
        """Join the worker node (again, after `kill_worker`): one CPU and the `rg_worker` resource."""
        self._ray_start([
            "--address", self.address, "--node-ip-address", self.worker_ip, "--num-cpus", "1",
            "--resources", json.dumps({"rg_worker": 1}), "--temp-dir", str(self.workdir / "worker"),
            "--metrics-export-port", str(self.metrics_ports[1]), "--object-store-memory", str(200 << 20),
        ], netns=True)

    def _ray_start(self, args: list[str], netns: bool = False) -> None:
        cmd = [self.ray, "start", *args]
        if netns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def worker_processes(self) -> list[psutil.Process]:
        """Every process of the worker node (every process in its namespace)."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(int(pid)))
            except psutil.Error:
                continue
        return procs

    def head_processes(self) -> list[psutil.Process]:
        """The head's Ray processes (their command lines name its temp dir) and everything they started."""
        marker = str(self.workdir / "head")
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in p.info["cmdline"] or ()):
                roots.append(p)
        out = list(roots)
        for root in roots:
            try:
                out += root.children(recursive=True)
            except psutil.Error:
                continue
        return out

    def kill_worker(self) -> int:
        """kill -9 every process of the worker node at once, as when its machine dies; how many there were."""
        procs = self.worker_processes()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def stop(self) -> None:
        """Serve shut down as an operator would, then every process of both nodes, and what they left in their
        process groups (Serve's HAProxy, once its manager is killed, lives on as an orphan otherwise)."""
        serve = str(Path(sys.executable).with_name("serve"))
        with contextlib.suppress(subprocess.TimeoutExpired):  # a head that no longer answers: the kill below
            subprocess.run([serve, "shutdown", "-y", "-a", f"http://{self.head_ip}:{self.dashboard_port}"],
                           env=self.env, capture_output=True, timeout=120, check=False)
        procs = self.worker_processes() + self.head_processes()
        groups = set()
        for p in procs:
            try:
                groups.add(os.getpgid(p.pid))
            except OSError:
                continue
        groups.discard(os.getpgid(0))
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                continue
        reap(procs, grace_s=10.0)
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                continue
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
