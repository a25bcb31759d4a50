"""`/v1/embeddings` from the default embedding model (vLLM's pooling runner), `/tokenize` and `/detokenize`, on the
real stack, through the official `openai` client: vectors, batches, base64, dimensions, keys, quotas, the ledger,
metrics; and the same routes forwarded to this stack as an upstream (engine `openai`)."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import LiveStack

TEXTS = ["def main():\n    return 0\n", "import os\nimport sys\n", "def main():\n    return 0\n"]


def _client(stack: LiveStack, key: str | None = None, strict: bool = True) -> openai.OpenAI:
    """Strict validation fails on the base64 the SDK asks for by default (it checks the string against
    `list[float]` before it decodes it): base64 calls run without."""
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key or stack.key, max_retries=0,
                         _strict_response_validation=strict)


def _http(stack: LiveStack, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, headers={"authorization": f"Bearer {key or stack.key}"}, timeout=60)


@pytest.fixture
def limited(stack: LiveStack) -> tuple[str, str]:
    r = stack.admin("POST", "/admin/keys", json={"name": "embeddings", "limits": {"rpm": 20, "tpm": 60}})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def test_a_batch_of_vectors_with_the_tokenizer_s_count(stack: LiveStack) -> None:
    client = _client(stack)
    out = client.embeddings.create(model=stack.embed_model, input=TEXTS, encoding_format="float")
    assert out.model == stack.embed_model and [d.index for d in out.data] == [0, 1, 2]
    assert all(len(d.embedding) == 256 and math.isclose(math.hypot(*d.embedding), 1.0, rel_tol=1e-3)
               for d in out.data)  # the model's width, normalised (its sentence-transformers layout says so)
    assert out.data[0].embedding == out.data[2].embedding != out.data[1].embedding
    with _http(stack) as http:
        counts = [http.post("/tokenize", json={"model": stack.embed_model, "prompt": t}).json()["count"]
                  for t in TEXTS]
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(counts) > 0
    decoded = _client(stack, strict=False).embeddings.create(model=stack.embed_model, input=TEXTS[:1])
    assert decoded.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-6)
    tokens = client.embeddings.create(model=stack.embed_model, input=[[5, 6, 7], [8]], encoding_format="float")
    assert tokens.usage.prompt_tokens == 4


def test_base64_and_dimensions(stack: LiveStack) -> None:
    with _http(stack) as http:
        r = http.post("/v1/embeddings", json={"model": stack.embed_model, "input": "x = 1", "dimensions": 64,
                                              "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(vector) == 64 and math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-3)  # cut, then normalised again


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": "x", "dimensions": 257}, None),  # past the model's width: vLLM's refusal, passed on
    ({"input": "x", "encoding_format": "bytes"}, "encoding_format"),
    ({"input": "word " * 3000}, "input"),  # past the context: vLLM's refusal
])
def test_bad_embedding_requests_are_400(stack: LiveStack, body: dict, param: str | None) -> None:
    with _http(stack) as http:
        r = http.post("/v1/embeddings", json={"model": stack.embed_model, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and (param is None or err["param"] == param), err


def test_each_model_refuses_the_other_s_endpoint(stack: LiveStack) -> None:
    with _http(stack) as http:
        r = http.post("/v1/embeddings", json={"model": stack.model, "input": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        assert "generation model" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"model": stack.embed_model, "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        assert "embedding model" in r.json()["error"]["message"]


def test_embeddings_are_reserved_settled_and_counted(stack: LiveStack, limited: tuple[str, str]) -> None:
    key_id, key = limited
    client = _client(stack, key)
    with pytest.raises(openai.RateLimitError):  # its estimate is past the key's tpm of 60
        client.embeddings.create(model=stack.embed_model, input=["word " * 40, "word " * 40], encoding_format="float")
    raw = client.embeddings.with_raw_response.create(model=stack.embed_model, input=TEXTS[0], encoding_format="float")
    used = raw.parse().usage.prompt_tokens
    rows = stack.usage_rows(key_id, 1)
    assert [(r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == \
        [(stack.embed_model, 1, used, 0)]
    per_endpoint = stack.admin("GET", f"/admin/usage?key_id={key_id}&endpoint=embeddings").json()["data"]
    assert [r["requests"] for r in per_endpoint] == [1]
    metrics = httpx.get(f"{stack.base_url}/metrics", headers={"authorization": f"Bearer {stack.admin_key}"}).text
    counted = {s.labels["status"]: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == "raygate_requests_total" and s.labels.get("endpoint") == "embeddings"
               and s.labels.get("model") == stack.embed_model}
    assert counted.get("200", 0) >= 1 and counted.get("429", 0) >= 1


def test_tokenize_a_chat_as_generation_counts_it_and_detokenize_back(stack: LiveStack,
                                                                     limited: tuple[str, str]) -> None:
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    key_id, key = limited
    with _http(stack, key) as http:
        counted = http.post("/tokenize", json={"model": stack.model, "prompt": "word " * 100})
        assert counted.status_code == 200 and counted.json()["count"] >= 100  # past the key's tpm: no tokens
    rows = stack.usage_rows(key_id, 1)
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(1, 0, 0)]
    with _http(stack) as http:
        tok = http.post("/tokenize", json={"model": "chat", "messages": messages, "return_token_strs": True}).json()
        chat = http.post("/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 1}).json()
        assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) == chat["usage"]["prompt_tokens"]
        assert tok["max_model_len"] == 1024
        text = http.post("/tokenize", json={"model": stack.model, "prompt": "import os"}).json()
        back = http.post("/detokenize", json={"model": stack.model, "tokens": text["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": "import os"}
        r = http.post("/detokenize", json={"model": stack.model, "tokens": [8192]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
        r = http.post("/tokenize", json={"model": stack.model})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_hostile_bodies_on_vllm_get_4xx_envelopes(stack: LiveStack) -> None:
    """Schemathesis over raygate's own schema of these routes, bodies aimed at both models (so each reaches vLLM's
    embedding serving or its tokenizer, and each model sees the other's route): no 5xx, every 4xx an envelope."""
    import schemathesis

    from tests.fuzzing import Fuzzer

    doc = httpx.get(f"{stack.base_url}/openapi.json").json()
    doc["paths"] = {p: v for p, v in doc["paths"].items() if p in ("/v1/embeddings", "/tokenize", "/detokenize")}
    fuzz = Fuzzer(25, (stack.embed_model, stack.model))
    ran = fuzz.run(schemathesis.openapi.from_dict(doc), stack.base_url,
                   lambda path: {"authorization": f"Bearer {stack.key}"})
    print("vLLM routes:", ran, dict(fuzz.statuses))
    assert len(ran) == 6 and fuzz.statuses[200] > 0 and fuzz.statuses[400] > 0


async def test_the_routes_forward_to_this_stack_as_an_upstream(stack: LiveStack, tmp_path,  # noqa: ANN001
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A second gateway (in this process) whose models are engine `openai` upstreams: this stack's chat and
    embedding models. Every route reaches vLLM through the upstream and comes back as it answered."""
    from gateway import create_app
    from gateway.backend import ModelBackend
    from gateway.settings import GatewaySettings
    from serve.config import ModelDeploymentConfig, UpstreamConfig
    from serve.factory import create_engine

    monkeypatch.setenv("UPSTREAM_KEY", stack.key)
    upstream = UpstreamConfig(base_url=f"{stack.base_url}/v1", api_key_env="UPSTREAM_KEY")
    engines = {name: create_engine(ModelDeploymentConfig(model=model, served_name=name, engine="openai",
                                                         upstream=upstream), None)
               for name, model in (("far-chat", stack.model), ("far-embed", stack.embed_model))}
    for e in engines.values():
        await e.start()
    key = "front-key-0123456789abcdef"
    app = create_app(GatewaySettings(api_keys=[key], home=tmp_path), ModelBackend(engines))
    auth = {"authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front",
                                     timeout=60) as http:
            client = openai.AsyncOpenAI(base_url="http://front/v1", api_key=key, http_client=http, max_retries=0,
                                        _strict_response_validation=True)
            emb = await client.embeddings.create(model="far-embed", input=TEXTS[:2], encoding_format="float")
            assert [len(d.embedding) for d in emb.data] == [256, 256] and emb.usage.prompt_tokens > 0
            resp = await client.responses.create(model="far-chat", input="Say hi.", max_output_tokens=4)
            assert resp.status in ("completed", "incomplete") and resp.usage is not None
            r = await http.post("/v1/messages", headers=auth, json={"model": "far-chat", "max_tokens": 3,
                                                                    "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["type"] == "message", r.text
            tok = await http.post("/tokenize", headers=auth, json={"model": "far-chat", "prompt": "import os"})
            assert tok.status_code == 200 and tok.json()["count"] > 0, tok.text
            back = await http.post("/detokenize", headers=auth, json={"model": "far-chat",
                                                                      "tokens": tok.json()["tokens"]})
            assert back.status_code == 200 and back.json()["prompt"] == "import os", back.text
            bad = await http.post("/v1/embeddings", headers=auth, json={"model": "far-chat", "input": "x"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "model", bad.text
    finally:
        for e in engines.values():
            await e.shutdown()
