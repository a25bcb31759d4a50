"""`POST /v1/embeddings`, `/tokenize` and `/detokenize` on the fake engine through the gateway: the official `openai`
client with strict validation, bad input in OpenAI's envelope, quotas reserved and settled, one ledger row each."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from gateway import create_app
from gateway.backend import ModelBackend
from gateway.governance.limits import Limits
from gateway.settings import GatewaySettings
from serve.config import FakeEngineConfig
from serve.fake_engine import FakeEngine
from tests.support import settled_outcomes

KEY = "test-key-0123456789abcdef"
ADMIN = {"authorization": "Bearer admin-key-0123456789abcdef"}
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def app(tmp_path):  # noqa: ANN201
    return create_app(GatewaySettings(api_keys=[KEY], home=tmp_path, admin_key=ADMIN["authorization"][7:]),
                      ModelBackend({"embed": FakeEngine("embed", FakeEngineConfig())}, aliases={"vectors": "embed"}))


@pytest.fixture
def http(app) -> httpx.AsyncClient:  # noqa: ANN001
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def sdk(http: httpx.AsyncClient, strict: bool = True) -> openai.AsyncOpenAI:
    """The official client; strict validation checks every field, but fails on the base64 the SDK asks for by
    default (it validates the string against `list[float]` before it decodes it), so those calls run without."""
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=KEY, http_client=http, max_retries=0,
                              _strict_response_validation=strict)


async def test_a_batch_of_embeddings_through_the_sdk(app, http) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    texts = ["the first text", "a second one here", "the first text"]
    floats = await sdk(http).embeddings.create(model="vectors", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "embed"
    assert all(len(d.embedding) == 64 and math.isclose(math.hypot(*d.embedding), 1.0, rel_tol=1e-6)
               for d in floats.data)
    assert floats.data[0].embedding == floats.data[2].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 10
    # The SDK asks for base64 unless told otherwise and decodes it: the same vectors, as float32.
    decoded = await sdk(http, strict=False).embeddings.create(model="vectors", input=texts)
    assert [[round(v, 5) for v in d.embedding] for d in decoded.data] == \
        [[round(v, 5) for v in d.embedding] for d in floats.data]
    short = await sdk(http).embeddings.create(model="embed", input="the first text", dimensions=8,
                                              encoding_format="float")
    assert len(short.data[0].embedding) == 8
    assert [(o.endpoint, o.status, o.prompt_tokens, o.completion_tokens) for o in seen] == \
        [("embeddings", 200, 10, 0)] * 2 + [("embeddings", 200, 3, 0)]


async def test_base64_on_the_wire_is_little_endian_float32(http) -> None:  # noqa: ANN001
    r = await http.post("/v1/embeddings", headers=AUTH, json={"model": "embed", "input": [[5, 6, 7]],
                                                              "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(raw) == 64 * 4 and math.isclose(math.hypot(*struct.unpack("<64f", raw)), 1.0, rel_tol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] == 3  # a token list counts its tokens


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": ["x"] * 2049}, "input"),
    ({"input": "x", "encoding_format": "bytes"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": 65}, "dimensions"),  # past the model's size: the engine's refusal
    ({"input": {"text": "x"}}, "input"),
])
async def test_bad_embedding_requests_are_400_naming_the_parameter(http, body, param) -> None:  # noqa: ANN001
    r = await http.post("/v1/embeddings", headers=AUTH, json={"model": "embed", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


async def test_embeddings_reserve_their_tokens_and_settle_to_the_count(app, http) -> None:  # noqa: ANN001
    _, key = app.state.governance.store.create_key(name="t", limits=Limits(tpm=40, rpm=100))
    auth = {"authorization": f"Bearer {key}"}
    words = " ".join(["word"] * 30)
    r = await http.post("/v1/embeddings", headers=auth, json={"model": "embed", "input": [words, words]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text  # 2 x 30 > 40
    r = await http.post("/v1/embeddings", headers=auth, json={"model": "embed", "input": words})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 30
    assert r.headers["x-ratelimit-remaining-tokens"] is not None
    r = await http.post("/v1/embeddings", headers=auth, json={"model": "embed", "input": words})
    assert r.status_code == 429  # 30 of 40 used: another 30 does not fit
    r = await http.post("/v1/embeddings", headers=auth, json={"model": "embed", "input": "four more words here"})
    assert r.status_code == 200  # settled to the engine's 30, so 10 are left (a reservation that stayed: none)


async def test_tokenize_and_detokenize_round_trip(app, http) -> None:  # noqa: ANN001
    seen = settled_outcomes(app)
    r = await http.post("/tokenize", headers=AUTH, json={"model": "vectors", "prompt": "tok5 tok6 tok7",
                                                         "return_token_strs": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 3, "max_model_len": 2048, "tokens": [5, 6, 7], "token_strs": ["tok5", "tok6", "tok7"]}
    r = await http.post("/tokenize", headers=AUTH, json={"model": "embed", "messages": [
        {"role": "user", "content": "tok1 tok2"}]})
    assert r.status_code == 200 and r.json()["tokens"] == [1, 2]
    r = await http.post("/detokenize", headers=AUTH, json={"model": "embed", "tokens": [5, 6, 7]})
    assert r.status_code == 200 and r.json() == {"prompt": "tok5 tok6 tok7"}
    assert [(o.endpoint, o.prompt_tokens, o.completion_tokens) for o in seen] == \
        [("tokenize", 0, 0), ("tokenize", 0, 0), ("detokenize", 0, 0)]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, None),  # neither a prompt nor messages
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),  # outside the vocabulary: the engine's refusal
    ("/detokenize", {"tokens": "5"}, "tokens"),
])
async def test_bad_tokenize_requests_are_400(http, path, body, param) -> None:  # noqa: ANN001
    r = await http.post(path, headers=AUTH, json={"model": "embed", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


async def test_tokenize_counts_a_request_and_no_tokens(app, http) -> None:  # noqa: ANN001
    _, key = app.state.governance.store.create_key(name="t", allowed_models=["embed"], limits=Limits(tpm=5, rpm=3))
    auth = {"authorization": f"Bearer {key}"}
    r = await http.post("/v1/embeddings", headers=auth, json={"model": "embed", "input": "one two three four"})
    assert r.status_code == 200  # reserved 5, settled to 4
    r = await http.post("/v1/embeddings", headers=auth, json={"model": "embed", "input": "one two three four"})
    assert r.status_code == 429  # the token budget is spent
    r = await http.post("/tokenize", headers=auth, json={"model": "embed", "prompt": "a b c d e f g h"})
    assert r.status_code == 200 and r.json()["count"] == 8  # costs no tokens
    r = await http.post("/detokenize", headers=auth, json={"model": "other", "tokens": [1]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # not the key's: counted too
    r = await http.post("/tokenize", headers=auth, json={"model": "embed", "prompt": "a"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


async def test_the_ledger_groups_usage_by_endpoint(app, http) -> None:  # noqa: ANN001
    record, key = app.state.governance.store.create_key(name="t")
    auth = {"authorization": f"Bearer {key}"}
    assert (await http.post("/v1/embeddings", headers=auth, json={"model": "embed", "input": "a b"})).status_code == 200
    assert (await http.post("/tokenize", headers=auth, json={"model": "embed", "prompt": "a b"})).status_code == 200
    rows = {}
    for endpoint in ("embeddings", "tokenize", "chat"):
        r = await http.get(f"/admin/usage?key_id={record.id}&endpoint={endpoint}", headers=ADMIN)
        assert r.status_code == 200, r.text
        rows[endpoint] = [(g["requests"], g["prompt_tokens"]) for g in r.json()["data"]]
    assert rows == {"embeddings": [(1, 2)], "tokenize": [(1, 0)], "chat": []}
    r = await http.get("/admin/usage?endpoint=images", headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "endpoint"
