"""Fuzzing with schemathesis: every route of raygate's own OpenAPI, and OpenAI's spec for chat, completions and
models, with positive and negative data, against a real HTTP server (uvicorn on a free port) running the
gateway on the fake engine with a key that has limits (so the quota path runs on every body).

Zero 5xx; every 4xx body is OpenAI's `ErrorResponse`. The cases run are printed per operation.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.errors import shape_of
from gateway.governance.limits import Limits
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine
from tests.oai_schema import assert_valid, spec
from tests.support import free_port

ADMIN = "admin-key-0123456789abcdef"
EXAMPLES = 100  # per operation and mode: both documents run in about a minute here
OPENAI_PATHS = ("/chat/completions", "/completions", "/models", "/models/{model}")


class Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the gateway did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, dict[str, Any]]]:
    settings_ = GatewaySettings(
        admin_key=ADMIN, home=tmp_path_factory.mktemp("fuzz"),
        routes={"smart": {"targets": [{"model": "fake", "weight": 1}], "fallbacks": ["other"]}},
    )
    engines = {name: FakeEngine(name, FakeEngineConfig(max_model_len=512)) for name in ("fake", "other")}
    app = create_app(settings_, ModelBackend(engines, aliases={"chat": "fake"}))
    _, key = app.state.governance.store.create_key(
        name="fuzz", allowed_models=["fake", "chat", "smart"],
        limits=Limits(tpm=10**9, tokens_per_day=10**12, max_concurrent=1000),
    )
    with Server(app) as server:
        yield server, key, app.openapi()


MODELS = (None, "fake", "chat", "smart")  # None: the body's own (random) model


def served(pair: tuple[Any, str | None]) -> Any:
    """A case whose body names a model the gateway serves (or keeps its own): past the 404, into the quota,
    the engine and the stream."""
    case, model = pair
    if model is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    return case


ANTHROPIC_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                         "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"}
STATUSES: Counter[int] = Counter()  # every answer's status, printed with the case counts


def _check(response: Any) -> None:
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        if shape_of(response.request.url.path) == "anthropic":
            doc = response.json()
            assert doc["type"] == "error" and set(doc["error"]) == {"type", "message"}, doc
            assert doc["error"]["type"] in ANTHROPIC_ERROR_TYPES and isinstance(doc["error"]["message"], str), doc
        else:
            assert_valid("ErrorResponse", response.json())


def _fuzz(schema: Any, base_url: str, auth: Any) -> dict[str, int]:
    """Run every operation of `schema` with both kinds of data; the cases run per operation."""
    ran: dict[str, int] = {}
    with httpx.Client(timeout=30) as client:

        def case_of(label: str) -> Any:
            return lambda case: call(case, label)

        def call(case: Any, label: str) -> None:
            ran[label] += 1
            kwargs = case.as_transport_kwargs(base_url=base_url)
            headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k.lower() != "authorization"}
            kwargs["headers"] = {**headers, **auth(case.path)}
            try:
                response = client.request(**{k: v for k, v in kwargs.items() if k in (
                    "method", "url", "headers", "params", "json", "content", "data")})
            except httpx.LocalProtocolError:
                reject()  # a header no HTTP client can put on the wire
            _check(response)

        for result in schema.get_all_operations():
            op = result.ok()
            for mode in GenerationMode:
                label = f"{op.label} [{mode.value}]"
                ran[label] = 0
                cases = st.tuples(op.as_strategy(generation_mode=mode), st.sampled_from(MODELS)).map(served)
                one = given(case=cases)(case_of(label))
                try:
                    settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(HealthCheck))(one)()
                except Unsatisfiable:  # negative data for an operation that takes nothing: there is none
                    assert mode is GenerationMode.NEGATIVE and ran.pop(label) <= 1
    return ran


def test_raygate_openapi_every_route(gateway) -> None:
    server, key, doc = gateway
    schema = schemathesis.openapi.from_dict(doc)
    admin_paths = ("/admin", "/metrics")
    ran = _fuzz(schema, server.url,
                lambda path: {"authorization": f"Bearer {ADMIN if path.startswith(admin_paths) else key}"})
    print("raygate's OpenAPI:", sum(ran.values()), "cases", ran, "statuses", dict(STATUSES))
    assert sum(ran.values()) >= EXAMPLES * len(ran) // 2


def test_openai_spec_chat_completions_models(gateway) -> None:
    server, key, _ = gateway
    doc = dict(spec())
    doc["paths"] = {p: v for p, v in doc["paths"].items() if p in OPENAI_PATHS}
    schema = schemathesis.openapi.from_dict(doc)
    ran = _fuzz(schema, server.url + "/v1", lambda path: {"authorization": f"Bearer {key}"})
    print("OpenAI's spec:", sum(ran.values()), "cases", ran, "statuses (both documents)", dict(STATUSES))
    assert sum(ran.values()) >= EXAMPLES * len(ran) // 2
