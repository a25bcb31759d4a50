"""deploy/: every manifest parses, passes the schema that can be installed here, and names what the code has.

Schemas: Ray Serve's own config schema (serve_config.yaml, serveConfigV2), Ray's cluster-launcher
schema (cluster.yaml), Kubernetes' schemas from kubernetes-validate (the RayService's pod
templates and Service), raygate's AppConfig (the application args). KubeRay's CRD itself is
not installable from a package registry: the RayService's own fields are checked against the
subset of its ray.io/v1 schema we use (RAYSERVICE_SCHEMA), closed so a misspelled field fails.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from kubernetes_validate.utils import latest_version
from ray.serve.schema import ServeDeploySchema

from gateway.config import AppConfig
from gateway.metrics import METRIC_NAMES
from raygate.cli import parser
from raygate.stack import SERVE_ENV, Stack

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = latest_version()
STACK_DEFAULTS = Stack.__dataclass_fields__
GATEWAY_PORT = STACK_DEFAULTS["port"].default
METRICS_PORT = STACK_DEFAULTS["metrics_export_port"].default
DASHBOARD_PORT = STACK_DEFAULTS["dashboard_port"].default

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_GROUP_COMMON = {"rayStartParams": _STR_MAP, "template": {"type": "object"}}
RAYSERVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["serveConfigV2", "rayClusterConfig"],
            "properties": {
                "serveConfigV2": {"type": "string"},
                "serveService": {"type": "object", "properties": {"metadata": {"type": "object"},
                                                                  "spec": {"type": "object"}}},
                "upgradeStrategy": {"type": "object"},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "rayClusterConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object"},
                        "headGroupSpec": {
                            "type": "object", "additionalProperties": False, "required": ["template"],
                            "properties": {**_GROUP_COMMON, "serviceType": {"enum": ["ClusterIP", "NodePort",
                                                                                      "LoadBalancer"]},
                                           "enableIngress": {"type": "boolean"}, "headService": {"type": "object"}},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object", "additionalProperties": False,
                                "required": ["groupName", "template"],
                                "properties": {**_GROUP_COMMON, "groupName": {"type": "string"},
                                               "replicas": {"type": "integer", "minimum": 0},
                                               "minReplicas": {"type": "integer", "minimum": 0},
                                               "maxReplicas": {"type": "integer", "minimum": 0},
                                               "numOfHosts": {"type": "integer", "minimum": 1},
                                               "idleTimeoutSeconds": {"type": "integer"}},
                            },
                        },
                    },
                },
            },
        },
    },
}


def _k8s(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S, strict=True)


def _app_config(serve_cfg: dict[str, Any]) -> AppConfig:
    ServeDeploySchema.model_validate(serve_cfg)  # Ray Serve's own schema
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "gateway.builder:build_app"
    return AppConfig.load(app["args"]["config"])


def test_serve_config() -> None:
    doc = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    cfg = _app_config(doc)
    assert doc["http_options"]["port"] == GATEWAY_PORT
    assert doc["logging_config"]["encoding"] == "JSON" and cfg.gateway.log_encoding == "JSON"
    assert cfg.gateway.autoscaling is not None


def test_rayservice() -> None:
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    jsonschema.validate(doc, RAYSERVICE_SCHEMA)
    spec = doc["spec"]
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    cfg = _app_config(serve_cfg)
    assert serve_cfg["http_options"]["port"] == GATEWAY_PORT
    assert cfg.gateway.autoscaling is not None and cfg.gateway.autoscaling.max_replicas > 1
    # Several replicas share quotas through Redis: the replicas get RAYGATE_REDIS_URL.
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    svc = spec["serveService"]
    _k8s({"apiVersion": "v1", "kind": "Service", **svc})
    assert [p["port"] for p in svc["spec"]["ports"]] == [GATEWAY_PORT]
    head = cluster["headGroupSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in [("head", head), *groups.items()]:
        _k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": group["template"]})
        assert group["rayStartParams"]["metrics-export-port"] == str(METRICS_PORT)
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        for flag in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY",
                     "RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE", "RAY_process_group_cleanup_enabled"):
            assert env[flag] == SERVE_ENV[flag]
        assert "RAYGATE_REDIS_URL" in env and "RAYGATE_KEY_SECRET" in env
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == GATEWAY_PORT and ports["metrics"] == METRICS_PORT
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == (name == "gpu")
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["ports"][1] == {"containerPort": DASHBOARD_PORT,
                                                                     "name": "dashboard"}


def test_cluster_launcher() -> None:
    doc = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert {"head", "cpu_worker", "gpu_worker"} == set(doc["available_node_types"])
    for cmd in doc["head_start_ray_commands"][1:] + doc["worker_start_ray_commands"][1:]:
        assert f"--metrics-export-port={METRICS_PORT}" in cmd
        for flag in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY",
                     "RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE", "RAY_process_group_cleanup_enabled"):
            assert f"{flag}={SERVE_ENV[flag]}" in cmd


def test_dockerfile() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    code = [ln for ln in lines if ln and not ln.startswith("#")]
    assert code[0].startswith("FROM python:3.11")
    for ln in code:
        if ln.startswith("COPY"):
            for src in shlex.split(ln)[1:-1]:
                assert (ROOT / src).exists(), src
    exposed = {int(p) for ln in code if ln.startswith("EXPOSE") for p in ln.split()[1:]}
    assert {GATEWAY_PORT, METRICS_PORT} <= exposed
    cmd = json.loads(next(ln for ln in code if ln.startswith("CMD"))[3:])
    assert cmd[0] == "raygate"
    args = parser().parse_args(cmd[1:])  # the flags exist
    assert args.port == GATEWAY_PORT and args.metrics_port == METRICS_PORT


def test_prometheus_scrape_config() -> None:
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT

    doc = yaml.safe_load((DEPLOY / "observability" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {"raygate-gateway", "ray", "serve-haproxy"}

    def port(job: str) -> int:
        return int(jobs[job]["static_configs"][0]["targets"][0].rsplit(":", 1)[1])

    assert port("raygate-gateway") == GATEWAY_PORT and jobs["raygate-gateway"]["metrics_path"] == "/metrics"
    assert port("ray") == METRICS_PORT
    assert port("serve-haproxy") == RAY_SERVE_HAPROXY_METRICS_PORT


def _ray_serve_metric_exists(name: str) -> bool:
    src = "\n".join(p.read_text() for p in (Path(ray.__file__).parent / "serve" / "_private").glob("*.py"))
    return f'"{name.removeprefix("ray_")}"' in src


def _vllm_metric_exists(name: str) -> bool:
    import vllm.v1.metrics.loggers as loggers

    return f'"vllm:{name.removeprefix("ray_vllm_")}"' in Path(loggers.__file__).read_text()


def test_grafana_dashboard_queries_name_real_series() -> None:
    dash = json.loads((DEPLOY / "observability" / "grafana" / "raygate.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("requests per second", "error rate", "time to first token", "inter-token", "tokens per second",
                  "quota rejections", "replicas", "kv-cache"):
        assert topic in titles, topic
    names = {n for e in exprs for n in re.findall(r"\b(ray(?:gate)?_[a-z_]+)", e)}
    assert names
    for name in names:
        if name.startswith("raygate_"):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in METRIC_NAMES, name
        elif name.startswith("ray_vllm_"):
            assert _vllm_metric_exists(name), name
        else:
            assert _ray_serve_metric_exists(name), name
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


@pytest.mark.parametrize("bad", [{"spec": {"rayClusterConfig": {"headGroupSpec": {"template": {}}},
                                           "serveConfigV2": "", "serveConfig": "typo"}}])
def test_rayservice_schema_refuses_unknown_fields(bad: dict[str, Any]) -> None:
    doc = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"}, **bad}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, RAYSERVICE_SCHEMA)
