"""`raygate bench` (also `python -m benchmarks`): scenarios, ad-hoc load on a URL, soak.

    raygate bench run benchmarks/scenarios/overhead.yaml           # side by side, interleaved
    raygate bench url --base-url http://127.0.0.1:8000/v1 --key K --model M --concurrency 1 16 64
    raygate bench url ... --rate 5 10 20 --slo ttft=0.5,tpot=0.05  # open loop, Poisson arrivals
    raygate bench soak benchmarks/scenarios/vllm.yaml --target raygate --minutes 30
    raygate bench summary benchmarks/results/overhead benchmarks/results/vllm
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks import report
from benchmarks.runner import Runner
from benchmarks.scenario import Scenario
from benchmarks.workload import Length

RESULTS = Path(__file__).resolve().parent / "results"


def _length(text: str) -> Length:
    lo, sep, hi = text.partition(":")
    return Length(min=int(lo), max=int(hi)) if sep else Length(fixed=int(lo))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.duration is not None:
        out["load.duration_s"] = args.duration
    if args.warmup is not None:
        out["load.warmup_s"] = args.warmup
    if args.ramp is not None:
        out["load.ramp_s"] = args.ramp
    if args.levels:
        out["load.levels"] = args.levels
    if args.slo is not None:
        out["slo"] = args.slo
    for item in args.set or []:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def execute(sc: Scenario, out_dir: Path, progress: bool | None, plots: bool = True) -> dict[str, Any]:
    """Run a scenario, check its goals, write the reports; returns the run."""
    runner = Runner(sc, out_dir, progress=progress)
    print(f"scenario {sc.name}: {len(sc.targets)} targets, {len(sc.workloads)} workloads, "
          f"levels {sc.load.levels} ({sc.load.mode} loop), scratch {runner.workdir}", flush=True)
    run = runner.run()
    run["goals"] = report.check_goals(sc.goals, run["points"])
    paths = report.write(run, out_dir, with_plots=plots)
    print(report.markdown(run))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return run


def cmd_run(args: argparse.Namespace) -> int:
    sc = Scenario.load_file(args.scenario, _overrides(args))
    run = execute(sc, Path(args.out or RESULTS / sc.name), args.progress, not args.no_plots)
    return 1 if args.strict and not all(g["met"] for g in run["goals"]) else 0


def cmd_url(args: argparse.Namespace) -> int:
    if bool(args.concurrency) == bool(args.rate):
        raise SystemExit("give --concurrency levels (closed loop) or --rate levels (open loop)")
    sc = Scenario.model_validate({
        "name": args.name,
        "description": f"{args.base_url}, model {args.model}",
        "targets": [{"name": "target", "base_url": args.base_url, "model": args.model, "key": args.key,
                     "ready_path": args.ready_path}],
        "workloads": [{
            "name": "stream" if args.stream else "json", "endpoint": args.endpoint, "stream": args.stream,
            "prompt_tokens": _length(args.prompt_tokens).model_dump(), "output_tokens":
                _length(args.output_tokens).model_dump(), "dataset": args.dataset, "exact_output": args.exact_output,
        }],
        "load": {"mode": "closed" if args.concurrency else "open", "levels": args.concurrency or args.rate,
                 "duration_s": args.duration or 15.0, "warmup_s": args.warmup or 0.0,
                 "ramp_s": args.ramp or 0.0,
                 "max_requests": args.max_requests},
        "slo": args.slo or "",
    })
    execute(sc, Path(args.out or RESULTS / sc.name), args.progress, not args.no_plots)
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from benchmarks import soak

    sc = Scenario.load_file(args.scenario, _overrides(args))
    runner = Runner(sc, Path(args.out or RESULTS / "soak"), progress=args.progress)
    result = soak.soak(runner, args.target, args.concurrency, args.minutes, args.sample_s, args.warmup_s)
    paths = soak.write(result, runner.out_dir)
    print((runner.out_dir / "soak.md").read_text())
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from benchmarks import chaos

    chaos.run(args.minutes, args.concurrency, Path(args.out or RESULTS / "chaos"))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """The goal tables of finished runs, one after another (what `make bench` prints last)."""
    ok = True
    print("| scenario | goal | workload | level | figure | bound | met |\n|---|---|---|---|---|---|---|")
    for d in args.dirs:
        run = json.loads((Path(d) / "results.json").read_text())
        for g in run.get("goals", []):
            ok &= g["met"]
            fig = "-" if g["figure"] is None else f"{g['figure']:.3f}"
            print(f"| {run['scenario']['name']} | {g['goal']} | {g['workload']} | {g['level']:g} | {fig} | "
                  f"{g['bound']} | {'yes' if g['met'] else '**no**'} |")
    return 0 if ok or not args.strict else 1


def parser(prog: str = "raygate bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", help="Results directory (default benchmarks/results/<scenario>).")
        sp.add_argument("--duration", type=float, help="Measured seconds per point.")
        sp.add_argument("--warmup", type=float, help="Unmeasured seconds before each point.")
        sp.add_argument("--ramp", type=float,
                        help="Closed loop: spread the streams' first requests over this many seconds.")
        sp.add_argument("--slo", help="Goodput SLO, e.g. ttft=0.5,tpot=0.05 (seconds).")
        sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="Progress bar (default: when stderr is a terminal).")
        sp.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")

    run = sub.add_parser("run", help="Run a scenario file (targets side by side).")
    run.add_argument("scenario")
    common(run)
    run.add_argument("--levels", type=float, nargs="+", help="Override the load levels.")
    run.add_argument("--set", action="append", help="Override a scenario field: load.duration_s=5 (repeatable).")
    run.add_argument("--strict", action="store_true", help="Exit 1 when a goal is missed.")
    run.set_defaults(func=cmd_run)

    url = sub.add_parser("url", help="Load one OpenAI-compatible base URL.")
    url.add_argument("--base-url", required=True)
    url.add_argument("--model", required=True)
    url.add_argument("--key")
    url.add_argument("--name", default="adhoc", help="Results directory name.")
    url.add_argument("--endpoint", choices=["chat", "completion"], default="chat")
    url.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    url.add_argument("--concurrency", type=float, nargs="+", help="Closed loop at these concurrencies.")
    url.add_argument("--rate", type=float, nargs="+", help="Open loop (Poisson) at these request rates.")
    url.add_argument("--prompt-tokens", default="32", help="N or MIN:MAX (uniform).")
    url.add_argument("--output-tokens", default="128", help="max_tokens: N or MIN:MAX (uniform).")
    url.add_argument("--exact-output", action="store_true", help="Send min_tokens/ignore_eos (vLLM servers).")
    url.add_argument("--dataset", help="JSONL of requests (messages or prompt, optional max_tokens).")
    url.add_argument("--max-requests", type=int, default=1_000_000, help="Cap per point.")
    url.add_argument("--ready-path", help="Path on the origin to poll until it answers 200 (default: no check).")
    common(url)
    url.set_defaults(func=cmd_url, levels=None, set=None)

    sk = sub.add_parser("soak", help="Long steady load on one target of a scenario; RSS drift.")
    sk.add_argument("scenario")
    sk.add_argument("--target", help="Target name (default: the first measured one).")
    sk.add_argument("--minutes", type=float, default=30.0)
    sk.add_argument("--concurrency", type=int, default=8)
    sk.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period.")
    sk.add_argument("--warmup-s", type=float, default=120.0, help="Seconds before drift is measured.")
    common(sk)
    sk.set_defaults(func=cmd_soak, levels=None, set=None)

    ch = sub.add_parser("chaos", help="`raygate up` under streamed load while its replica, engine and Redis are "
                        "killed and the model is rolled out and back; what clients saw.")
    ch.add_argument("--minutes", type=float, default=10.0)
    ch.add_argument("--concurrency", type=int, default=8, help="Streaming clients, each a closed loop.")
    ch.add_argument("--out", help="Results directory (default benchmarks/results/chaos).")
    ch.set_defaults(func=cmd_chaos)

    sm = sub.add_parser("summary", help="Goal tables of finished runs.")
    sm.add_argument("dirs", nargs="+")
    sm.add_argument("--strict", action="store_true", help="Exit 1 when a goal is missed.")
    sm.set_defaults(func=cmd_summary)
    return p


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    # A plain SIGTERM ends Python at once, with the targets it started left running: unwind instead, so
    # the runner stops each one (its process group) on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None, prog: str = "raygate bench") -> int:
    args = parser(prog).parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(args.func(args))
    except (ValueError, OSError, RuntimeError, TimeoutError) as exc:  # bad scenario, target failed to start
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks"))
