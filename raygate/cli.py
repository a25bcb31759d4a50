"""`raygate` subcommands: up, status, models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from models.refs import ModelRef
from models.registry import RegistryError
from raygate import home as home_mod
from raygate import keys_cli, train_cli

# vLLM's arguments for the default model. It was not trained to call tools, so vLLM's parser (which vLLM loads
# only with auto tool choice on) finds none in free text; with it vLLM accepts `tool_choice` "required" and a
# named function and meets them by constrained decoding. `pythonic` has no structural tag, so vLLM constrains a
# forced call with a JSON schema, which honours `disable_any_whitespace` (xgrammar's option, so xgrammar named);
# under hermes' structural tag, or with whitespace left free, a model this small fills the JSON with blanks
# until `max_tokens` cuts it off (seen: 200 tokens of blanks and no tool call).
DEFAULT_MODEL_ENGINE_KWARGS: dict[str, Any] = {
    "max_model_len": 2048, "tool_call_parser": "pythonic", "enable_auto_tool_choice": True,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def default_app_config(home: Path, engine: str = "vllm") -> dict[str, Any]:
    """What `raygate up` serves without a config file: the default chat and embedding models, co-located."""
    return {
        "gateway": {
            "settings": {
                "home": str(home), "api_keys_file": str(home / "dev-key"), "admin_key_file": str(home / "admin-key"),
            }
        },
        "serve": {
            "registry": str(home / "registry"),
            "models": [
                {"model": "raygate/tiny-chat@stable", "engine": engine, "engine_kwargs": DEFAULT_MODEL_ENGINE_KWARGS},
                # /v1/embeddings (vLLM's pooling runner). A small engine, idle until asked: it reserves no Ray CPU,
                # so what a small host runs beside the stack (a `raygate train` job on its cluster) still schedules.
                {"model": "raygate/tiny-embed@stable", "engine": engine, "num_cpus": 0},
            ],
        },
    }


def served_models(base_url: str, key: str) -> list[dict[str, Any]]:
    """What clients can send as `model`, as the running gateway reports it."""
    req = urllib.request.Request(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return list(json.loads(resp.read())["data"])


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.config import AppConfig
    from raygate.signals import StopRequest
    from raygate.stack import Stack, StartCancelled, StartFailed, token_hint

    home = home_mod.home_dir(args.home)
    reg = home_mod.registry(home)
    home_mod.ensure_default_model(reg)
    home_mod.ensure_embedding_model(reg)
    key_path, key = home_mod.ensure_dev_key(home)
    admin_path, _ = home_mod.ensure_admin_key(home)
    if args.config:
        cfg = AppConfig.load(args.config)
        settings = cfg.gateway.settings
        settings.setdefault("home", str(home))
        settings.setdefault("api_keys_file", str(key_path))
        settings.setdefault("admin_key_file", str(admin_path))
    else:
        cfg = AppConfig.load(default_app_config(home, args.engine))
    stack = Stack(
        cfg, host=args.host, port=args.port, dashboard_port=args.dashboard_port,
        metrics_export_port=args.metrics_port, state_dir=home / "stacks",
    )
    stop = StopRequest()  # Ctrl-C or SIGTERM, any number of times
    wanted = ", ".join(m.model for m in cfg.serve.models)
    print(f"raygate: starting Ray and deploying {wanted} (engine start takes up to a minute)...", flush=True)
    rc = 0
    try:
        stack.start(cancelled=stop.is_set)  # Ctrl-C / SIGTERM while the engine starts: stop at once
        try:
            models = served_models(stack.base_url, key)
        except urllib.error.HTTPError:  # the config names its own keys and left the dev key out
            models = [{"id": m.model, "root": ""} for m in cfg.serve.models]
        print(
            "\nraygate is up\n"
            f"  base URL   {stack.base_url}/v1\n"
            f"  model      {', '.join(m['id'] + ' (' + m.get('root', '') + ')' for m in models)}\n"
            f"  API key    {key}\n"
            f"             (also in {key_path})\n"
            f"  admin key  in {admin_path}  (/admin/keys, or `raygate keys ...`)\n"
            f"  console    {stack.base_url}/ui  (log in with the admin key)\n"
            f"  dashboard  {stack.dashboard_url}  ({token_hint()})\n"
            f"  metrics    {stack.base_url}/metrics (gateway), http://127.0.0.1:{args.metrics_port}/metrics (Ray, Serve, vLLM)\n"
            "  try:       curl -s {0}/v1/chat/completions -H \"Authorization: Bearer $(cat {1})\" "
            "-H 'Content-Type: application/json' -d '{{\"model\": \"{2}\", \"messages\": "
            "[{{\"role\": \"user\", \"content\": \"hello\"}}], \"max_tokens\": 16}}'\n"
            "Ctrl-C stops everything.".format(stack.base_url, key_path, models[0]["id"]),
            flush=True,
        )
        while not stop.wait(5.0):
            stack.tend()
    except StartCancelled:
        rc = 130
    except StartFailed as exc:
        print(f"raygate: {exc}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        print("raygate: shutting down...", flush=True)
        stack.stop()
    print("raygate: stopped.", flush=True)
    return rc


def cmd_status(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from raygate.stack import token_hint

    try:
        context = ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        print(f"raygate: no running Ray cluster found ({exc})", file=sys.stderr)
        return 1
    try:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the handle's router announces itself at INFO
        status = serve.status()
        dashboard = context.dashboard_url or f"127.0.0.1:{args.dashboard_port}"
        print(f"dashboard: http://{dashboard}  ({token_hint()})")
        alive = [n for n in ray.nodes() if n["Alive"]]
        for node in alive:
            cpus = node["Resources"].get("CPU", 0)
            extra = sorted(k for k in node["Resources"] if k not in _RAY_RESOURCES and not k.startswith("node:"))
            print(f"node {node['NodeManagerAddress']}: alive, {cpus:g} CPU" + "".join(f", {k}" for k in extra))
        if context.dashboard_url:  # Ray's state API asks this dashboard, not RAY_ADDRESS's (it reads that first)
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{context.dashboard_url}"
        placed = _replica_nodes({n["NodeID"]: n["NodeManagerAddress"] for n in alive})
        if not status.applications:
            print("no Serve applications")
        for app_name, app in status.applications.items():
            print(f"application {app_name}: {_plain(app.status)}")
            for dep_name, dep in app.deployments.items():
                replicas = ", ".join(f"{_plain(state)}={n}" for state, n in dep.replica_states.items())
                where = placed.get(f"ServeReplica:{app_name}:{dep_name}")
                on = f"  on {', '.join(sorted(where))}" if where else ""
                print(f"  deployment {dep_name}: {_plain(dep.status)}  replicas: {replicas or 'none'}{on}")
                for line in _engine_lines(serve, app_name, dep_name):
                    print(f"    {line}")
    finally:
        ray.shutdown()
    return 0


_RAY_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory", "accelerator_type"})


def _replica_nodes(nodes: dict[str, str]) -> dict[str, list[str]]:
    """The node addresses of each Serve replica actor class's live replicas (empty if Ray's state API is away)."""
    from ray.util.state import list_actors

    placed: dict[str, list[str]] = {}
    try:
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the state API lives in the dashboard: no placement then, the rest stands
        return placed
    for actor in actors:
        if actor.class_name.startswith("ServeReplica:") and actor.node_id:
            placed.setdefault(actor.class_name, []).append(nodes.get(actor.node_id, actor.node_id))
    return placed


def _plain(value: Any) -> str:
    """An enum's value (`HEALTHY`), not its repr (`DeploymentStatus.HEALTHY`)."""
    return str(getattr(value, "value", value))


def _engine_lines(serve: Any, app_name: str, dep_name: str) -> list[str]:
    """The versions and variants a gateway deployment's replica serves (empty for other deployments).

    The call runs inside an event loop of its own: with RAY_SERVE_THROUGHPUT_OPTIMIZED set in
    this process's environment, a handle routes from the loop it is used on.
    """
    import asyncio

    async def ask() -> dict[str, Any]:
        handle = serve.get_deployment_handle(dep_name, app_name=app_name)
        return await asyncio.wait_for(handle.engine_stats.remote(), timeout=30)

    try:
        stats = asyncio.run(ask())
    except AttributeError:  # not a raygate gateway
        return []
    except Exception as exc:  # noqa: BLE001 - no replica answering right now: say so
        return [f"engines: no answer from a replica ({type(exc).__name__}: {exc})"]
    return [f"engine {ref}: variant {s.get('variant') or 'full'}, running {s['running']}, "
            f"{'healthy' if s['healthy'] else 'UNHEALTHY'}" for ref, s in stats.items()]


def cmd_models(args: argparse.Namespace) -> int:
    home = home_mod.home_dir(args.home)
    reg = home_mod.registry(home)
    if args.models_cmd == "list":
        rows = reg.list()
        if not rows:
            print("registry is empty")
        for m in rows:
            aliases = [a for a, v in reg.aliases(m.name).items() if v == m.version]
            variants = ",".join(v.name for v in m.variants) or "-"
            print(f"{m.ref:40s} {m.format:5s} {m.total_size / 1e6:8.1f} MB  {m.created:%Y-%m-%d %H:%M}  "
                  f"{variants:38s} {','.join(sorted(aliases))}")
    elif args.models_cmd == "add":
        manifest = reg.publish(args.name, args.path, metadata={"source": str(Path(args.path).resolve())},
                               aliases=args.alias or [])
        print(f"published {manifest.ref} ({len(manifest.files)} files, {manifest.total_size / 1e6:.1f} MB)")
    elif args.models_cmd == "show":
        print(json.dumps(reg.resolve(args.ref).model_dump(mode="json"), indent=2))
    elif args.models_cmd == "alias":
        reg.set_alias(args.name, args.alias, args.version)
        print(f"{args.name}@{args.alias} -> {args.version}")
    elif args.models_cmd == "promote":
        ref = ModelRef.parse(args.ref)
        if ref.version is None:
            raise ValueError(f"promote takes an exact version, NAME@VERSION (got {args.ref!r})")
        reg.manifest(ref.name, ref.version)  # exists
        if args.canary is not None:
            reg.set_canary(ref.name, ref.version, args.canary, of=args.alias)
            print(f"{ref.name}@{args.alias}: {100 - args.canary:g}% stays on version {reg.aliases(ref.name)[args.alias]}, "
                  f"{args.canary:g}% goes to {ref}")
        else:
            previous = reg.promote(ref.name, ref.version, alias=args.alias)
            print(f"{ref.name}@{args.alias}: {previous or 'none'} -> {ref.version}")
        print("running gateways follow within their registry_poll_s (new engine first, then the switch, then a drain)")
    elif args.models_cmd == "rollback":
        current = reg.aliases(args.name).get(args.alias)
        target = reg.rollback(args.name, alias=args.alias)
        print(f"{args.name}@{args.alias}: {current} -> {target}")
    elif args.models_cmd == "build-default":
        print(f"default models: {home_mod.ensure_default_model(reg).ref}, {home_mod.ensure_embedding_model(reg).ref}")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    """One gateway process on uvicorn (tests, benchmarks, several processes sharing Redis)."""
    import asyncio
    import gc

    import uvicorn

    from gateway import logs
    from gateway.app import create_app
    from gateway.backend import build_backend
    from gateway.config import AppConfig
    from gateway.deployment import registry_for
    from gateway.settings import GatewaySettings

    cfg = AppConfig.load(args.config)
    if args.home:  # the global --home, as `up` takes it
        cfg.gateway.settings.setdefault("home", str(home_mod.home_dir(args.home)))
    settings = GatewaySettings(**cfg.gateway.settings)
    registry = registry_for(cfg, settings)
    logs.configure()  # JSON lines on stderr

    async def serve_forever() -> None:
        backend = build_backend(cfg.serve, registry)
        app = create_app(settings, backend, registry=registry)  # opens the key store first: an unreachable one fails before engines load
        await backend.start()
        server = uvicorn.Server(
            uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="warning", lifespan="on")
        )
        # Everything built so far (modules, app, engines) lives as long as the process: keep it out of
        # the collector's scans, as a Serve replica does in throughput mode.
        gc.freeze()
        # uvicorn puts back the handlers it found and raises the signal it caught again once it has
        # stopped: with the default ones the process died there, before the engines were shut down, and
        # vLLM's engine processes lived on. Handlers that do nothing let the shutdown below run.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        try:
            await server.serve()
        finally:
            await backend.shutdown()

    asyncio.run(serve_forever())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raygate", description="OpenAI-compatible LLM serving gateway on Ray.")
    p.add_argument("--home", default=None, help="State directory (default $RAYGATE_HOME or ~/.raygate).")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="Start Ray, deploy the models and serve the gateway (foreground).")
    up.add_argument("--config", help="AppConfig YAML (default: the default model).")
    up.add_argument("--engine", choices=["vllm", "fake"], default="vllm", help="Engine for the default config.")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument("--metrics-port", type=int, default=8080,
                    help="Ray's Prometheus export port (ray_serve_*, vLLM engine metrics); the gateway's own are on /metrics")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="Deployments, replicas and the dashboard of the running stack.")
    st.add_argument("--address", default="auto",
                    help="The Ray cluster to report on: its head's HOST:PORT (default: the one started on this machine).")
    st.add_argument("--dashboard-port", type=int, default=8265, help="Printed when Ray does not say its dashboard's URL.")
    st.set_defaults(func=cmd_status)

    keys_cli.add_parser(sub)
    train_cli.add_parser(sub)
    gw = sub.add_parser("gateway", help="Run the gateway and its engines in one uvicorn process, without Ray.")
    gw.add_argument("--config", required=True, help="AppConfig YAML.")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.set_defaults(func=cmd_gateway)

    sub.add_parser("bench", help="Load-test any OpenAI-compatible URL or run benchmark scenarios "
                   "(`raygate bench -h`).", add_help=False)

    models = sub.add_parser("models", help="The model registry.")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="Every version with its aliases.")
    add = msub.add_parser("add", help="Publish a Hugging Face checkpoint directory as a new version.")
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--alias", action="append", help="Alias to point at the new version (repeatable).")
    show = msub.add_parser("show", help="The manifest of a reference (name, name@3, name@stable).")
    show.add_argument("ref")
    alias = msub.add_parser("alias", help="Point an alias at a version.")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    promote = msub.add_parser("promote", help="Move an alias (default stable) to a version, or split a canary off it.")
    promote.add_argument("ref", help="NAME@VERSION to roll out.")
    promote.add_argument("--alias", default="stable", help="Alias the running deployments follow (default stable).")
    promote.add_argument("--canary", type=float, metavar="PERCENT",
                         help="Send only this percent of the alias's traffic to the version (0 < PERCENT < 100).")
    rollback = msub.add_parser("rollback", help="Return an alias to the version it had before its last promotion.")
    rollback.add_argument("name")
    rollback.add_argument("--alias", default="stable")
    msub.add_parser("build-default", help="Build and publish the default models (chat, embedding) if missing.")
    models.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from benchmarks.cli import main as bench_main

        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        if args.cmd == "keys":
            return keys_cli.cmd_keys(args, home_mod.home_dir(args.home))
        if args.cmd == "train":
            return train_cli.cmd_train(args)
        return int(args.func(args))
    except (ValueError, LookupError, RegistryError) as exc:
        print(f"raygate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
