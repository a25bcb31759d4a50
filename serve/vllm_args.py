"""vLLM's arguments for a deployment: one source (the config's `vllm_args()`), checked by vLLM's own parser.

A deployment's engine gets what `vllm serve` would get on its command line: raygate's defaults, the
deployment's `engine_kwargs` over them, the model's path and name, and what the hardware and artifact
decide (the compute dtype on a CPU without native bf16, bitsandbytes for such a variant, Ray workers for
tensor/pipeline parallelism). vLLM's parser reads them, so its defaults and validation are vLLM's own;
a name it does not know, or a value it refuses, is reported as the `engine_kwargs` entry it came from.
vLLM is imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

from serve.config import ModelDeploymentConfig
from serve.hardware import cpu_supports_bf16


class InvalidEngineArgs(ValueError):
    """An `engine_kwargs` entry vLLM does not know or refuses; the message names it."""


def engine_cli_args(
    cfg: ModelDeploymentConfig, model_path: str, served_name: str, quantization: str | None = None
) -> list[str]:
    """vLLM command-line arguments for a deployment (what `vllm serve` would get)."""
    args = dict(cfg.vllm_args())
    if cfg.num_gpus == 0 and "dtype" not in args and not cpu_supports_bf16():
        args["dtype"] = "float32"  # vLLM's `auto` takes the checkpoint's bf16, which this CPU only emulates
    if cfg.gpus_per_engine > 1:
        args.setdefault("distributed_executor_backend", "ray")
    if quantization and quantization.startswith("bnb"):
        args.setdefault("quantization", "bitsandbytes")  # vLLM also reads it from config.json; explicit is clearer
    argv = ["--model", model_path, "--served-model-name", served_name]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif value is None:
            continue
        elif isinstance(value, (dict, list)):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_engine_args(
    cfg: ModelDeploymentConfig, model_path: str, served_name: str, quantization: str | None = None
) -> argparse.Namespace:
    """vLLM's parsed arguments for a deployment, or InvalidEngineArgs naming the entry vLLM refused."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    known = {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001 - argparse's own list
    for key in cfg.vllm_args():
        if "--" + key.replace("_", "-") not in known:
            where = f"engine_kwargs.{key}" if key in cfg.engine_kwargs else key
            raise InvalidEngineArgs(f"{cfg.model}: {where}: vLLM has no such argument "
                                    "(`python -m vllm.entrypoints.openai.api_server --help` lists them)")
    # `false` for a plain on-switch is its default: leave it out where vLLM has no `--no-` form.
    argv = [a for a in engine_cli_args(cfg, model_path, served_name, quantization)
            if not a.startswith("--no-") or a in known]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        raise InvalidEngineArgs(f"{cfg.model}: engine_kwargs refused by vLLM: {message[-1] if message else '?'}") from None
    check_parsers(cfg, args)
    return args


def check_parsers(cfg: ModelDeploymentConfig, args: argparse.Namespace) -> None:
    """The tool-call and reasoning parsers named are vLLM's (or a plugin's), and auto tool choice has its parser:
    a typo fails at start, naming the entry, instead of at the first request that sends `tools`."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for key, name, plugin, known in (
        ("tool_call_parser", args.tool_call_parser, getattr(args, "tool_parser_plugin", None),
         ToolParserManager.list_registered()),
        ("reasoning_parser", getattr(args, "reasoning_parser", None), getattr(args, "reasoning_parser_plugin", None),
         ReasoningParserManager.list_registered()),
    ):
        if name and not plugin and name not in known:
            raise InvalidEngineArgs(f"{cfg.model}: engine_kwargs.{key}: vLLM has no parser {name!r} "
                                    f"(it has {', '.join(sorted(known))})")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise InvalidEngineArgs(f"{cfg.model}: engine_kwargs.enable_auto_tool_choice needs engine_kwargs.tool_call_parser "
                                "(the format the model writes its tool calls in)")


def check_engine_args(cfg: ModelDeploymentConfig) -> None:
    """Parse a vLLM deployment's arguments as its engine will (InvalidEngineArgs if vLLM refuses one)."""
    if cfg.engine == "vllm":
        parse_engine_args(cfg, "/model", "model")
