"""Typed configs: YAML in, validation errors out, Serve options derived."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway.builder import check_shared_state, deployment_options
from gateway.config import AppConfig, AutoscalingConfig, GatewayDeploymentConfig
from gateway.settings import GatewaySettings
from serve.config import ModelDeploymentConfig, ServeConfig
from serve.vllm_args import InvalidEngineArgs, check_engine_args, engine_cli_args

ROOT = Path(__file__).resolve().parents[2]


def test_every_field_has_a_description() -> None:
    for cls in (ModelDeploymentConfig, ServeConfig, AppConfig, GatewayDeploymentConfig, AutoscalingConfig,
                GatewaySettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


def test_deploy_serve_config_builds() -> None:
    data = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    app = data["applications"][0]
    assert app["import_path"] == "gateway.builder:build_app"
    cfg = AppConfig.load(app["args"]["config"])
    opts = deployment_options(cfg)
    assert opts["max_ongoing_requests"] >= 256
    assert opts["ray_actor_options"]["num_cpus"] > 0
    # What `serve deploy` does with it: import the builder and call it the way Serve calls builders (it refuses a
    # builder with more than one parameter, which a first multi-node deploy found).
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
    assert isinstance(built, Application)


def test_parallel_workers_on_gpus_and_on_cpus() -> None:
    """On GPUs: a GPU bundle per worker and vLLM's Ray executor. On CPUs: no placement group, vLLM's own (mp)
    executor, the workers' threads on split cores."""
    cfg = ModelDeploymentConfig(model="m", engine_kwargs={"tensor_parallel_size": 2}, num_gpus=1)
    opts = deployment_options(AppConfig(serve=ServeConfig(models=[cfg])))
    assert opts["placement_group_bundles"][1:] == [{"GPU": 1}, {"GPU": 1}]
    assert "--distributed-executor-backend" in engine_cli_args(cfg, "/p", "m")
    cpu = ModelDeploymentConfig(model="m", engine_kwargs={"tensor_parallel_size": 2, "pipeline_parallel_size": 2})
    assert (cpu.workers_per_engine, cpu.gpus_per_engine) == (4, 0)
    opts = deployment_options(AppConfig(serve=ServeConfig(models=[cpu])))
    assert "placement_group_bundles" not in opts and opts["ray_actor_options"]["num_gpus"] == 0
    assert "--distributed-executor-backend" not in engine_cli_args(cpu, "/p", "m")


def test_cpu_workers_split_the_cores() -> None:
    import os

    from serve.hardware import CPU_BIND_ENV, cpu_worker_binding, split_cores

    assert split_cores([0, 1], 2) == "0|1"
    assert split_cores([3, 2, 1, 0, 4], 2) == "0,1,2|3,4"
    with pytest.raises(ValueError, match="need 3 cores"):
        split_cores([0, 1], 3)
    os.environ.pop(CPU_BIND_ENV, None)
    with cpu_worker_binding(1):
        assert CPU_BIND_ENV not in os.environ  # one worker: vLLM's own binding
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        with cpu_worker_binding(2):
            assert os.environ[CPU_BIND_ENV] == split_cores(cores, 2)
        assert CPU_BIND_ENV not in os.environ


def test_engine_kwargs_are_the_one_source_of_vllm_arguments() -> None:
    cfg = ModelDeploymentConfig(model="m", engine_kwargs={"max_model_len": 512, "enforce_eager": True,
                                                           "dtype": "bfloat16", "enable_prefix_caching": False})
    args = engine_cli_args(cfg, "/ckpt", "org/m")
    assert args[:4] == ["--model", "/ckpt", "--served-model-name", "org/m"]
    assert "--enforce-eager" in args and args[args.index("--max-model-len") + 1] == "512"
    assert args[args.index("--dtype") + 1] == "bfloat16" and "--no-enable-prefix-caching" in args
    # raygate's defaults where engine_kwargs names nothing, engine_kwargs over them where it does.
    assert args[args.index("--scheduling-policy") + 1] == "priority"
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(1 << 30), "CPU engines: 1 GiB, not a host share"
    own = engine_cli_args(ModelDeploymentConfig(model="m", engine_kwargs={"max_num_seqs": 8}), "/p", "m")
    assert own.count("--max-num-seqs") == 1 and own[own.index("--max-num-seqs") + 1] == "8"
    gpu = engine_cli_args(ModelDeploymentConfig(model="m", num_gpus=1), "/p", "m")
    assert "--kv-cache-memory-bytes" not in gpu, "GPU engines size their cache by gpu_memory_utilization"
    assert "--enable-lora" in engine_cli_args(ModelDeploymentConfig(model="m", lora=True), "/p", "m")
    for reserved in ({"model": "x"}, {"served_model_name": "x"}, {"max-model-len": 5}):
        with pytest.raises(ValidationError, match="engine_kwargs"):
            ModelDeploymentConfig(model="m", engine_kwargs=reserved)


def test_vllm_parser_names_the_engine_kwarg_it_refuses() -> None:
    check_engine_args(ModelDeploymentConfig(model="m", engine_kwargs={"max_model_len": 512, "stream_interval": 4,
                                                                      "enable_prefix_caching": False}))
    with pytest.raises(InvalidEngineArgs, match=r"engine_kwargs\.max_num_seq\b"):
        check_engine_args(ModelDeploymentConfig(model="m", engine_kwargs={"max_num_seq": 8}))
    with pytest.raises(InvalidEngineArgs, match="engine_kwargs"):
        check_engine_args(ModelDeploymentConfig(model="m", engine_kwargs={"max_num_seqs": "many"}))
    check_engine_args(ModelDeploymentConfig(model="m", engine="fake", engine_kwargs={"anything": 1}))  # not vLLM's


def test_tool_and_reasoning_parsers_are_checked_against_vllm_s_at_start() -> None:
    def check(**kwargs: object) -> None:
        check_engine_args(ModelDeploymentConfig(model="m", engine_kwargs=kwargs))

    check(tool_call_parser="hermes", enable_auto_tool_choice=True, reasoning_parser="qwen3")
    with pytest.raises(InvalidEngineArgs, match=r"m: engine_kwargs\.tool_call_parser: vLLM has no parser 'hermez' "
                                                r"\(it has .*hermes"):
        check(tool_call_parser="hermez")
    with pytest.raises(InvalidEngineArgs, match=r"engine_kwargs\.reasoning_parser: vLLM has no parser 'qwen'"):
        check(reasoning_parser="qwen")
    with pytest.raises(InvalidEngineArgs, match=r"enable_auto_tool_choice needs engine_kwargs\.tool_call_parser"):
        check(enable_auto_tool_choice=True)


def test_a_misspelt_vllm_argument_fails_the_build_naming_it() -> None:
    from gateway.builder import build_app

    with pytest.raises(InvalidEngineArgs, match=r"engine_kwargs\.max_modle_len"):
        build_app({"serve": {"models": [{"model": "m", "engine_kwargs": {"max_modle_len": 512}}]}})


def test_cpu_dtype_follows_the_hardware(monkeypatch) -> None:
    import serve.vllm_args as va
    from serve.hardware import cpu_flags, cpu_supports_bf16

    assert cpu_flags("processor: 0\nflags\t: fpu avx2 avx512_bf16\n") == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_supports_bf16({"avx2", "amx_bf16"}) and not cpu_supports_bf16({"avx2"})
    monkeypatch.setattr(va, "cpu_supports_bf16", lambda: False)
    args = engine_cli_args(ModelDeploymentConfig(model="m"), "/p", "m")
    assert args[args.index("--dtype") + 1] == "float32"
    explicit = engine_cli_args(ModelDeploymentConfig(model="m", engine_kwargs={"dtype": "bfloat16"}), "/p", "m")
    assert explicit[explicit.index("--dtype") + 1] == "bfloat16" and explicit.count("--dtype") == 1
    assert "--dtype" not in engine_cli_args(ModelDeploymentConfig(model="m", num_gpus=1), "/p", "m")
    monkeypatch.setattr(va, "cpu_supports_bf16", lambda: True)
    assert "--dtype" not in engine_cli_args(ModelDeploymentConfig(model="m"), "/p", "m")


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        ServeConfig.load({"models": [{"model": "m", "colour": "red"}]})
    with pytest.raises(ValidationError):
        ServeConfig.load({"models": []})


def test_autoscaling_env_and_logging_reach_serve() -> None:
    app = AppConfig.load({
        "gateway": {"autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8},
                    "env_vars": {"OTEL_TRACES_EXPORTER": "otlp"}, "metrics_dir": "/tmp/m",
                    "settings": {"redis_url": "redis://127.0.0.1:6379/0"}},
        "serve": {"models": [{"model": "m", "engine": "fake"}]},
    })
    opts = deployment_options(app)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == 3 and opts["autoscaling_config"]["target_ongoing_requests"] == 8
    env = opts["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp" and env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/m"
    assert env["VLLM_CONFIGURE_LOGGING"] == "0"
    assert opts["logging_config"] == {"encoding": "JSON", "log_level": "INFO", "enable_access_log": False}
    check_shared_state(app)
    app.gateway.settings = {}
    with pytest.raises(ValueError, match="redis_url"):
        check_shared_state(app)  # up to 3 replicas without a shared quota store
    with pytest.raises(ValidationError):
        AutoscalingConfig(min_replicas=3, max_replicas=2)


def test_gateway_metrics_pool_in_a_directory_of_the_cluster_s_own_unless_set() -> None:
    """Two stacks on one host (two `raygate up`, a test's and a user's) each pool their replicas' samples apart: a
    second stack's start once wiped the first's `/metrics`."""
    import tempfile

    from gateway.builder import metrics_dir

    app = AppConfig.load({"app_name": "chat", "serve": {"models": [{"model": "m", "engine": "fake"}]}})
    assert metrics_dir(app, "node-a") == f"{tempfile.gettempdir()}/raygate-metrics/node-a/chat"
    assert metrics_dir(app, "node-b") != metrics_dir(app, "node-a")  # a cluster started again: a new folder
    app.gateway.metrics_dir = "/srv/metrics"
    assert metrics_dir(app, "node-a") == "/srv/metrics"


def test_engine_stat_logger_drops_only_per_token_histograms() -> None:
    """Ray's agent replays every histogram observation in Python; the per-token one is left out."""
    from serve.engine_metrics import PER_TOKEN_HISTOGRAMS, without_per_token_histograms

    class Recorded:
        def __init__(self) -> None:
            self.values: list[float] = []

        def observe(self, value: float) -> None:
            self.values.append(value)

    class VllmLogger:  # the shape of vLLM's PrometheusStatLogger: one histogram per engine index
        def __init__(self, vllm_config, engine_indexes=None) -> None:
            self.config = vllm_config
            self.histogram_inter_token_latency = {i: Recorded() for i in engine_indexes or [0]}
            self.histogram_time_to_first_token = {i: Recorded() for i in engine_indexes or [0]}

    logger = without_per_token_histograms(VllmLogger)("cfg", [0, 1])
    assert logger.config == "cfg" and isinstance(logger, VllmLogger)
    for idx in (0, 1):
        logger.histogram_inter_token_latency[idx].observe(0.01)
        logger.histogram_time_to_first_token[idx].observe(0.2)
        assert logger.histogram_time_to_first_token[idx].values == [0.2]
    assert not any(isinstance(h, Recorded) for h in logger.histogram_inter_token_latency.values())

    # The attribute names still exist in the installed vLLM (a rename would silently re-enable them).
    import inspect

    from vllm.v1.metrics.loggers import PrometheusStatLogger

    source = inspect.getsource(PrometheusStatLogger)
    assert all(f"self.{attr}" in source for attr in PER_TOKEN_HISTOGRAMS)
