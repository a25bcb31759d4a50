"""Typed configs: YAML in, validation errors out, Serve options derived."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway.builder import deployment_options
from gateway.builder import check_shared_state
from gateway.config import AppConfig, AutoscalingConfig, GatewayDeploymentConfig
from gateway.settings import GatewaySettings
from serve.config import ModelDeploymentConfig, ServeConfig
from serve.vllm_engine import engine_cli_args

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


def test_parallelism_needs_gpus() -> None:
    with pytest.raises(ValidationError):
        ModelDeploymentConfig(model="m", tensor_parallel_size=2)
    cfg = ModelDeploymentConfig(model="m", tensor_parallel_size=2, num_gpus=1)
    app = AppConfig(serve=ServeConfig(models=[cfg]))
    opts = deployment_options(app)
    assert opts["placement_group_bundles"][1:] == [{"GPU": 1}, {"GPU": 1}]
    assert "--distributed-executor-backend" in engine_cli_args(cfg, "/p", "m")


def test_engine_args_pass_through() -> None:
    cfg = ModelDeploymentConfig(model="m", max_model_len=512, engine_kwargs={"enforce_eager": True, "dtype": "bfloat16"})
    args = engine_cli_args(cfg, "/ckpt", "org/m")
    assert args[:4] == ["--model", "/ckpt", "--served-model-name", "org/m"]
    assert "--enforce-eager" in args and "--max-model-len" in args
    assert args[args.index("--dtype") + 1] == "bfloat16"


def test_stream_interval_reaches_vllm() -> None:
    assert "--stream-interval" not in engine_cli_args(ModelDeploymentConfig(model="m"), "/p", "m")
    args = engine_cli_args(ModelDeploymentConfig(model="m", stream_interval=4), "/p", "m")
    assert args[args.index("--stream-interval") + 1] == "4"
    both = engine_cli_args(ModelDeploymentConfig(model="m", stream_interval=4, engine_kwargs={"stream_interval": 2}),
                           "/p", "m")
    assert both.count("--stream-interval") == 1 and both[both.index("--stream-interval") + 1] == "2"
    with pytest.raises(ValidationError):
        ModelDeploymentConfig(model="m", stream_interval=0)


def test_cpu_dtype_follows_the_hardware(monkeypatch) -> None:
    import serve.vllm_engine as ve

    from serve.hardware import cpu_flags, cpu_supports_bf16

    assert cpu_flags("processor: 0\nflags\t: fpu avx2 avx512_bf16\n") == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_supports_bf16({"avx2", "amx_bf16"}) and not cpu_supports_bf16({"avx2"})
    monkeypatch.setattr(ve, "cpu_supports_bf16", lambda: False)
    args = engine_cli_args(ModelDeploymentConfig(model="m"), "/p", "m")
    assert args[args.index("--dtype") + 1] == "float32"
    explicit = engine_cli_args(ModelDeploymentConfig(model="m", engine_kwargs={"dtype": "bfloat16"}), "/p", "m")
    assert explicit[explicit.index("--dtype") + 1] == "bfloat16" and explicit.count("--dtype") == 1
    assert "--dtype" not in engine_cli_args(ModelDeploymentConfig(model="m", num_gpus=1), "/p", "m")
    monkeypatch.setattr(ve, "cpu_supports_bf16", lambda: True)
    assert "--dtype" not in engine_cli_args(ModelDeploymentConfig(model="m"), "/p", "m")


def test_cpu_executor_reaches_vllm() -> None:
    from serve.vllm_engine import UNIPROC_EXECUTOR

    def backend(cfg: ModelDeploymentConfig) -> str | None:
        args = engine_cli_args(cfg, "/p", "m")
        return args[args.index("--distributed-executor-backend") + 1] if "--distributed-executor-backend" in args else None

    assert backend(ModelDeploymentConfig(model="m")) is None, "vLLM's own default (mp)"
    assert backend(ModelDeploymentConfig(model="m", cpu_executor="uni")) == UNIPROC_EXECUTOR
    assert backend(ModelDeploymentConfig(model="m", cpu_executor="uni", num_gpus=1)) is None, "CPU engines only"
    own = ModelDeploymentConfig(model="m", cpu_executor="uni", engine_kwargs={"distributed_executor_backend": "mp"})
    assert backend(own) == "mp" and engine_cli_args(own, "/p", "m").count("--distributed-executor-backend") == 1
    with pytest.raises(ValidationError):
        ModelDeploymentConfig(model="m", cpu_executor="auto")


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
