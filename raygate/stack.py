"""Start and stop a local raygate stack: Ray, Serve's HTTP ingress, the gateway app."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from gateway.config import AppConfig
from raygate.daemon_placement import confine, daemon_cores, engine_worker_cores
from raygate.leftovers import StackRecord, stop_leftovers
from raygate.standby import Standby

logger = logging.getLogger(__name__)

# Read at import time by every Ray process: set before `import ray` starts the cluster. These are the
# flags of Serve's ingress (HAProxy) that clusters run with too (deploy/kuberay, deploy/cluster.yaml).
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # direct ingress, gRPC handles, user code on the replica loop
    "RAY_SERVE_ENABLE_HA_PROXY": "1",  # bundled HAProxy instead of the Python HTTP proxy
    # HAProxy hands each POST's body to the conversation router (gateway.conversation_routing); unused without it.
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    "RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE": "2",  # two routers per node: HAProxy moves to the other while Serve restarts one
    # Throughput mode buffers 1,000 replica log records before writing any; Serve's own access log is off
    # and the gateway logs little per request (its access log from a thread of its own), so write at once.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # Each Ray worker in a process group of its own, killed whole when the worker exits: a replica that crashes
    # or is killed takes its vLLM engine processes with it instead of leaving them running as orphans.
    "RAY_process_group_cleanup_enabled": "1",
    # A replica behind HAProxy stays reachable this long when it stops, for load balancers to deregister it
    # (Serve: 30 s, which made every stop of `raygate up` take 35 s). HAProxy is this node's only balancer and
    # retries a refused connection on another replica (`retry-on conn-failure`), so 2 s is enough here;
    # the KubeRay and cluster manifests keep Serve's 30 s for balancers outside the cluster.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Serve's controller reconciles every 0.5 s instead of 0.1 s. Each step asks the GCS for every node's
    # resources: on a small host the two were the costliest of Ray's own processes while tokens stream (at 64
    # streams, 1.7 of Ray's 3.9 CPU-s; 0.7 at 0.5 s, docs/performance.md). Serve then takes a step (a replica
    # started, stopped, scaled) within half a second. The cluster manifests keep Serve's 0.1 s: their head is
    # the control plane's alone.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# When the replicas take client connections themselves (gateway/listener.py) there is no Serve ingress:
# neither HAProxy nor Serve's direct ingress (with it, Serve starts its Python proxy whatever
# `proxy_location` says), and no balancer to stay reachable for while a replica stops.
LISTENING_REPLICAS_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}


def stack_env(replicas_listen: bool) -> dict[str, str]:
    """The environment `raygate up` starts Ray with."""
    if replicas_listen:
        return {**SERVE_ENV, **LISTENING_REPLICAS_ENV}
    return {**SERVE_ENV, "RAY_SERVE_HAPROXY_NBTHREAD": str(haproxy_threads())}


# Ray's bookkeeping processes run at the lowest priority (Ray starts them at nice 0, its workers at 15):
# on a small CPU host their wake-ups (dashboard agent, GCS, monitors, the Serve controller's loop)
# otherwise pre-empt the gateway relaying tokens and the engine computing them. The raylet stays: it
# starts the workers at its own niceness + 15.
DAEMON_NICE = 19


class StartCancelled(Exception):
    """The stack was told to stop while it was starting."""


class StartFailed(RuntimeError):
    """Serve gave up deploying the app; the message says why (the replicas' own errors)."""


@dataclass
class Stack:
    """A local Ray cluster running the raygate Serve application."""

    config: AppConfig
    host: str = "127.0.0.1"
    port: int = 8000
    dashboard_port: int = 8265
    metrics_export_port: int = 8080  # Ray's Prometheus endpoint: ray_serve_*, vLLM's engine metrics, ray_* (scraped per node)
    num_cpus: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # beside stack_env's, overriding it
    state_dir: Path | None = None  # where the records of running stacks are kept (`leftovers`); None: no record
    started: bool = False
    _record: StackRecord | None = field(default=None, init=False, repr=False)
    _standby: Standby | None = field(default=None, init=False, repr=False)
    _metrics_dir: str | None = field(default=None, init=False, repr=False)

    @property
    def replicas_listen(self) -> bool:
        """The gateway replicas take client connections on `port` themselves (no Serve ingress: one node,
        nothing in the config that needs Serve's, see `GatewayConfig.needs_serve_ingress`)."""
        return self.config.gateway.needs_serve_ingress() is None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, ready_timeout_s: float = 600.0, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Start Ray, Serve and the app; wait until `/ready` answers 200. `cancelled` (asked while waiting)
        ends the wait early with `StartCancelled`; the caller then stops what has started."""
        listen = self.replicas_listen
        env = {**stack_env(listen), **self.env}
        for key, value in env.items():
            os.environ.setdefault(key, value)
        for key in LISTENING_REPLICAS_ENV:  # this mode's, whatever an earlier stack in this process set
            if key in env:
                os.environ[key] = env[key]
            else:
                os.environ.pop(key, None)
        if self.state_dir is not None:
            stopped = stop_leftovers(self.state_dir)
            if stopped:
                logger.warning("stopped what a killed raygate up left running: %s", ", ".join(stopped))
            self._record = StackRecord(self.state_dir)
        # A stack left running, or what a killed one left, holds these; Ray refuses two of its ports the same:
        # said now (with the holder's pid), not as a bind error from deep inside Ray or a replica.
        clash = port_clash({"--port": self.port, "--dashboard-port": self.dashboard_port,
                            "--metrics-port": self.metrics_export_port})
        if clash:
            raise StartFailed(clash)
        check_port_free(self.host, self.port)
        check_port_free("127.0.0.1", self.dashboard_port, "--dashboard-port")
        check_port_free("127.0.0.1", self.metrics_export_port, "--metrics-port")
        import ray
        from ray import serve

        from gateway.builder import build_application, metrics_dir

        # ray.init installs its own SIGTERM handler (it aborts the process); keep the caller's.
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        ray.init(
            num_cpus=self.num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=self.dashboard_port,
            _metrics_export_port=self.metrics_export_port,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        self.started = True
        self.keep_record()
        lower_priority(ray_daemons(), DAEMON_NICE)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)
        # Gateway metrics are pooled per node (the replicas make the folder): by default in a folder of this
        # cluster's own, which the stop removes; in the operator's `metrics_dir`, from zero for a new cluster.
        if self.config.gateway.metrics_dir:
            shutil.rmtree(self.config.gateway.metrics_dir, ignore_errors=True)
        else:
            self._metrics_dir = metrics_dir(self.config)
        serve.start(
            proxy_location="Disabled" if listen else None,
            http_options={"host": self.host, "port": self.port},
            logging_config=self.config.gateway.serve_logging(),
        )
        lower_priority(ray_daemons(), DAEMON_NICE)  # now with Serve's controller
        # Deploy without waiting here (serve.run waits for the app to run, deaf to Ctrl-C while the engine
        # starts); the ready wait below asks `cancelled` and Serve's status as it goes.
        serve.run_many(
            [serve.RunTarget(build_application(self.config, listen=(self.host, self.port) if listen else None),
                             name=self.config.app_name,
                             route_prefix=self.config.route_prefix)],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        self.wait_ready(ready_timeout_s, cancelled)
        self.tend()
        if listen:
            self._standby = Standby(self.host, self.port).start()

    def tend(self) -> None:
        """Once the app is ready, and every few seconds while `raygate up` serves (engines and replicas come and
        go): one look at the stack's processes, recorded and used to keep Ray's daemons off the cores vLLM's CPU
        workers are bound to."""
        procs = stack_processes()
        self.keep_record(procs)
        self.confine_daemons(procs)

    def confine_daemons(self, procs: list[psutil.Process]) -> None:
        """Ray's daemons on the cores the vLLM CPU workers among `procs` leave (`raygate.daemon_placement`)."""
        if self.started:
            confine(ray_daemons(), daemon_cores(set(os.sched_getaffinity(0)), engine_worker_cores(procs)))

    def keep_record(self, procs: list[psutil.Process] | None = None) -> None:
        """Record the processes the stack runs now (`procs`, or a fresh look), so that the next start can stop
        them if this process is killed before it stops them itself."""
        if self._record is not None and self.started:
            self._record.write(stack_processes() if procs is None else procs)

    def wait_ready(self, timeout_s: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"{self.base_url}/ready"
        last = "no answer"
        while time.monotonic() < deadline:
            if cancelled():
                raise StartCancelled("stopped before raygate was ready")
            self._raise_if_deploy_failed()
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(1.0)
        raise TimeoutError(f"raygate was not ready at {url} after {timeout_s:.0f}s ({last})")

    def _raise_if_deploy_failed(self) -> None:
        """Serve gave up on the app (a replica's constructor raised, for one): say why instead of waiting on."""
        from ray import serve

        try:
            app = serve.status().applications.get(self.config.app_name)
        except Exception:  # noqa: BLE001 - the controller is busy or starting: ask again next time
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            reasons = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
            raise StartFailed("\n".join([f"the Serve application failed to deploy: {app.message}", *reasons]))

    def stop(self) -> None:
        if not self.started:
            return
        import ray
        from ray import serve

        if self._standby is not None:  # first: a stop refuses new connections once the replicas stop listening
            self._standby.stop()
            self._standby = None
        procs = stack_processes()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.started = False
            # Until they are gone: Ray's agents outlive ray.shutdown a few seconds holding the metrics port, and a
            # replica Ray killed (a stop that timed out) leaves its vLLM engine running.
            reap(procs)
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
                with contextlib.suppress(OSError):  # the cluster's folder, empty unless another app used it
                    os.rmdir(os.path.dirname(self._metrics_dir))
            if self._record is not None:
                self._record.remove()


_DAEMON_MARKERS = (
    "/gcs/gcs_server", "dashboard/dashboard.py", "ray-dashboard-", "ray::DashboardAgent", "ray::RuntimeEnvAgent",
    "_private/log_monitor.py", "autoscaler/_private/monitor.py", "ray::ServeController",
)


# Ray's dashboard agent takes this port on every node (`ray start --dashboard-agent-listen-port`'s default,
# not randomised), and Ray refuses to start when another of its ports is the same.
RAY_AGENT_PORT = 52365


def port_clash(ports: dict[str, int]) -> str | None:
    """Why these ports (flag -> port) cannot serve one stack together, or None: two the same, or one that
    Ray's dashboard agent takes on every node."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port == RAY_AGENT_PORT:
            return f"{flag} {port} is the port Ray's dashboard agent takes on every node; pass another {flag}."
        if port in seen:
            return f"{seen[port]} and {flag} are both {port}; pass another {flag}."
        seen[port] = flag
    return None


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Raise `StartFailed` naming the process that listens on (host, port): a stack left running, for one."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of a stopped stack in TIME_WAIT
    try:
        probe.bind((host, port))
        return
    except OSError as exc:
        error = exc
    finally:
        probe.close()
    owners = set()
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.Error):
                    owners.add(f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:80]})")
    held = f"; held by {', '.join(sorted(owners))}" if owners else ""
    raise StartFailed(f"cannot listen on {host}:{port}: {error.strerror}{held}. Stop it, or pass another {flag}.")


def haproxy_threads() -> int:
    """HAProxy's threads: Serve's 4, but no more than this host's cores, where more threads only take
    turns with the engine (1 thread on 2 cores was worse than 4; commit 95be96c)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def is_ray_daemon(argv: list[str]) -> bool:
    """A Ray system process that serves no request (never the raylet, a worker or a replica).

    Only the program (or its process title) and its script count: the raylet's own arguments name the
    agents it starts.
    """
    if not argv:
        return False
    head = argv[0] + " " + next((a for a in argv[1:3] if a.endswith(".py")), "")
    return any(marker in head for marker in _DAEMON_MARKERS)


def _descendants_where(match: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    """This process's descendants that `match` (those that vanish or cannot be read are left out)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in children:
        with contextlib.suppress(psutil.Error):
            if match(p):
                out.append(p)
    return out


def ray_daemons() -> list[psutil.Process]:
    """Ray's system processes that this process started, with what they started in turn."""
    daemons = {p.pid for p in _descendants_where(lambda p: is_ray_daemon(p.cmdline()))}

    def under_a_daemon(p: psutil.Process) -> bool:
        return p.pid in daemons or any(a.pid in daemons for a in p.parents())

    return _descendants_where(under_a_daemon)


def lower_priority(procs: list[psutil.Process], nice: int) -> None:
    """Set every thread of `procs` to at least `nice` (Linux schedules threads: each has its own)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            for t in p.threads():
                with contextlib.suppress(psutil.Error):
                    thread = psutil.Process(t.id)
                    if thread.nice() < nice:
                        thread.nice(nice)


def stack_processes() -> list[psutil.Process]:
    """Every process of the Ray cluster this process started: Ray's own, its workers (the replicas) and what
    they started (vLLM's engines, HAProxy). Other children of this process (a test's Redis) are left out."""
    ray_dir = _ray_package_dir()
    try:
        roots = [p for p in psutil.Process().children() if _runs_from(p, ray_dir)]
    except psutil.Error:
        return []
    out = list(roots)
    for root in roots:
        with contextlib.suppress(psutil.Error):
            out.extend(root.children(recursive=True))
    return out


def _ray_package_dir() -> str:
    spec = importlib.util.find_spec("ray")
    return (spec.submodule_search_locations or [""])[0] if spec else "/nonexistent"


def _runs_from(proc: psutil.Process, directory: str) -> bool:
    """`proc`'s program or script is under `directory` (Ray's GCS, raylet and Python daemons all are)."""
    try:
        return any(a.startswith(directory + os.sep) for a in proc.cmdline()[:3])
    except psutil.Error:
        return False


def reap(procs: list[psutil.Process], grace_s: float = 5.0) -> list[int]:
    """Wait up to `grace_s` for `procs` to exit, kill what is left; the pids that had to be killed.

    A replica Ray killed (a stop that timed out) cannot close its engine: vLLM's engine core then
    lives on as an orphan, holding its KV cache and, on CPUs, spinning its worker's threads.
    """
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    killed = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            killed.append(f"{p.pid} ({p.name()})")
            p.kill()
    if alive:
        psutil.wait_procs(alive, timeout=5)
        logger.warning("killed %d processes left behind by the stop: %s", len(alive), ", ".join(killed))
    return [p.pid for p in alive]


def token_hint() -> str:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    return f"token auth on; the token is in {path} (or run: ray get-auth-token)"
