"""Fuzzing with schemathesis: every route of raygate's own OpenAPI, and OpenAI's spec for chat, completions, embeddings and
models, with positive and negative data, against a real HTTP server (uvicorn on a free port) running the
gateway on the fake engine with a key that has limits (so the quota path runs on every body).

Zero 5xx; every 4xx body is OpenAI's `ErrorResponse`. The cases run are printed per operation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.limits import Limits
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine
from tests.fuzzing import Fuzzer
from tests.oai_schema import spec
from tests.support import free_port, own_database

ADMIN = "admin-key-0123456789abcdef"
EXAMPLES = 100  # per operation and mode: both documents run in about a minute here
OPENAI_PATHS = ("/chat/completions", "/completions", "/embeddings", "/models", "/models/{model}")


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
    with own_database() as url:  # PostgreSQL, as a shared gateway runs: it refuses text SQLite would keep
        settings_ = GatewaySettings(
            admin_key=ADMIN, home=tmp_path_factory.mktemp("fuzz"), database_url=url, key_secret="f" * 32,
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
        # Every request the fuzzing made was billed: no usage row refused by the database (a NUL in `user`...).
        ledger = app.state.governance.ledger
        assert ledger.dropped == 0 and ledger.written > 0, (ledger.dropped, ledger.written)


MODELS = (None, "fake", "chat", "smart")  # None: the body's own (random) model
FUZZ = Fuzzer(EXAMPLES, MODELS)


def test_raygate_openapi_every_route(gateway) -> None:
    server, key, doc = gateway
    schema = schemathesis.openapi.from_dict(doc)
    admin_paths = ("/admin", "/metrics")
    ran = FUZZ.run(schema, server.url,
                   lambda path: {"authorization": f"Bearer {ADMIN if path.startswith(admin_paths) else key}"})
    print("raygate's OpenAPI:", sum(ran.values()), "cases", ran, "statuses", dict(FUZZ.statuses))
    assert sum(ran.values()) >= EXAMPLES * len(ran) // 2


def test_openai_spec_chat_completions_models(gateway) -> None:
    server, key, _ = gateway
    doc = dict(spec())
    doc["paths"] = {p: v for p, v in doc["paths"].items() if p in OPENAI_PATHS}
    schema = schemathesis.openapi.from_dict(doc)
    ran = FUZZ.run(schema, server.url + "/v1", lambda path: {"authorization": f"Bearer {key}"})
    print("OpenAI's spec:", sum(ran.values()), "cases", ran, "statuses (both documents)", dict(FUZZ.statuses))
    assert sum(ran.values()) >= EXAMPLES * len(ran) // 2
