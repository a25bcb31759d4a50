"""Schemathesis over an OpenAPI document against a live gateway: every operation with positive and negative data,
bodies steered to models the gateway serves; zero 5xx, and every 4xx in the route's error envelope.

Used on the fake engine (`tests/governance/test_fuzz.py`) and on vLLM (`tests/integration/test_embeddings_vllm.py`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from gateway.errors import shape_of
from tests.oai_schema import assert_valid

ANTHROPIC_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                         "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"}


def check_answer(response: Any) -> None:
    """No 5xx; a 4xx is OpenAI's `ErrorResponse`, or Anthropic's error on its routes."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        if shape_of(response.request.url.path) == "anthropic":
            doc = response.json()
            assert doc["type"] == "error" and set(doc["error"]) == {"type", "message"}, doc
            assert doc["error"]["type"] in ANTHROPIC_ERROR_TYPES and isinstance(doc["error"]["message"], str), doc
        else:
            assert_valid("ErrorResponse", response.json())


class Fuzzer:
    """Runs `examples` cases per operation and mode; a body's `model` is replaced by one of `models` (None keeps
    the generated one). `statuses` counts every answer's status across runs."""

    def __init__(self, examples: int, models: Sequence[str | None]) -> None:
        self.examples = examples
        self.models = tuple(models)
        self.statuses: Counter[int] = Counter()

    @staticmethod
    def _served(pair: tuple[Any, str | None]) -> Any:
        """A case whose body names a model the gateway serves (or keeps its own): past the 404, into the quota,
        the engine and the stream."""
        case, model = pair
        if model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        return case

    def run(self, schema: Any, base_url: str, auth: Callable[[str], dict[str, str]]) -> dict[str, int]:
        """Every operation of `schema` with both kinds of data; the cases run per operation."""
        ran: dict[str, int] = {}
        with httpx.Client(timeout=60) as client:

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
                self.statuses[response.status_code] += 1
                check_answer(response)

            for result in schema.get_all_operations():
                op = result.ok()
                for mode in GenerationMode:
                    label = f"{op.label} [{mode.value}]"
                    ran[label] = 0
                    cases = st.tuples(op.as_strategy(generation_mode=mode), st.sampled_from(self.models))
                    one = given(case=cases.map(self._served))(case_of(label))
                    try:
                        settings(max_examples=self.examples, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(HealthCheck))(one)()
                    except Unsatisfiable:  # negative data for an operation that takes nothing: there is none
                        assert mode is GenerationMode.NEGATIVE and ran.pop(label) <= 1
        return ran
