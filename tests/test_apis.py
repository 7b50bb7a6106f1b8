"""The OpenAI- and TEI-compatible routes under real gunicorn (127.0.0.1) on the tiny approved artifacts:
the official `openai` client, and raw HTTP against text-embeddings-inference's documented shapes. Every
answer must equal what the service's own `/api/*` routes (or the artifact itself) give."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest

from pipeline.memory.harness import GunicornService
from serve.artifacts import load_approved
from serve.config import SessionSettings
from serve.runtime import ModelRuntime
from tests.conftest import TinyRun

TEXTS = ["a quiet, funny film", "the plot goes nowhere", "記憶 and 😀 emoji"]


@pytest.fixture(scope="module")
def service(tiny_run: TinyRun) -> Iterator[GunicornService]:
    with GunicornService(tiny_run.service) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: GunicornService) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/v1", api_key="not-checked", max_retries=0)


def runtime(tiny_run: TinyRun, name: str) -> ModelRuntime:
    artifact = load_approved(tiny_run.artifacts / name)
    return ModelRuntime(artifact.folder, SessionSettings(), max_seq_len=64, max_tokens_per_run=4096)


def decoded(packed: Any) -> np.ndarray:
    return np.frombuffer(base64.b64decode(packed), dtype="<f4")


def native(service: GunicornService, path: str, texts: list[str], model: str) -> Any:
    reply = service.request("POST", path, {"inputs": texts, "model": model})
    assert reply.status == 200, reply.body
    return reply.body


def test_openai_client_floats_and_base64_equal_the_native_vectors(
    service: GunicornService, client: openai.OpenAI, tiny_run: TinyRun
) -> None:
    expected = np.array(native(service, "/api/embed", TEXTS, "tiny-embed")["embeddings"], dtype=np.float32)
    for encoding in ("float", "base64"):
        answer = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format=encoding)
        assert answer.object == "list" and answer.model == "tiny-embed"
        assert [d.index for d in answer.data] == [0, 1, 2] and {d.object for d in answer.data} == {"embedding"}
        # Asked for explicitly, base64 comes back as the string the service sent.
        vectors = [decoded(d.embedding) if encoding == "base64" else d.embedding for d in answer.data]
        assert np.array_equal(np.array(vectors, dtype=np.float32), expected), encoding
    tokens = sum(map(len, runtime(tiny_run, "tiny-embed").token_ids(TEXTS)))
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens
    # One text against one text: a dynamically quantized variant scales its activations per run, so a
    # row's vector moves in the fourth decimal with the rows run beside it.
    alone = np.array(native(service, "/api/embed", TEXTS[:1], "tiny-embed")["embeddings"], dtype=np.float32)
    one = client.embeddings.create(model="tiny-embed", input=TEXTS[0])  # the SDK's default: base64
    assert len(one.data) == 1 and np.array_equal(np.array(one.data[0].embedding, dtype=np.float32), alone[0])


def test_base64_is_little_endian_float32(service: GunicornService) -> None:
    body = {"model": "tiny-embed", "input": TEXTS, "encoding_format": "base64"}
    data = service.request("POST", "/v1/embeddings", body).body["data"]
    floats = service.request("POST", "/v1/embeddings", {**body, "encoding_format": "float"}).body["data"]
    for packed, plain in zip(data, floats, strict=True):
        assert np.array_equal(decoded(packed["embedding"]), np.array(plain["embedding"], dtype=np.float32))


def test_openai_models_and_errors_in_openai_shape(service: GunicornService, client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["tiny-clf", "tiny-embed"]
    model = client.models.retrieve("tiny-embed")
    assert model.object == "model" and model.owned_by == "memfit" and model.created > 1_700_000_000
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="x")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError) as shortened:
        client.embeddings.create(model="tiny-embed", input="x", dimensions=8)
    assert shortened.value.param == "dimensions"
    same = client.embeddings.create(model="tiny-embed", input="x", dimensions=32, user="someone")
    assert len(same.data[0].embedding) == 32
    with pytest.raises(openai.UnprocessableEntityError) as classifier:
        client.embeddings.create(model="tiny-clf", input="x")
    assert "text-classification" in classifier.value.message
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        client.embeddings.create(model="tiny-embed", input=["x"] * 9)
    assert too_many.value.code == "unprocessable" and "max_batch" in too_many.value.message
    reply = service.request("POST", "/v1/embeddings", {"model": "tiny-embed", "input": [[101, 2023]]})
    assert reply.status == 400 and set(reply.body["error"]) == {"message", "type", "param", "code"}
    assert reply.body["error"]["type"] == "invalid_request_error" and reply.body["error"]["param"] == "input"
    assert "check_embedding_ctx_length=False" in reply.body["error"]["message"]
    assert service.request("GET", "/v1/nowhere").body["error"]["code"] == "not_found"


def test_openai_client_with_an_api_key(tiny_run: TinyRun) -> None:
    with GunicornService(tiny_run.service, env={"API_KEY": "s3cret"}) as keyed:
        url = f"http://127.0.0.1:{keyed.port}/v1"
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).embeddings.create(model="tiny-embed", input="x")
        assert refused.value.code == "invalid_api_key"
        answer = openai.OpenAI(base_url=url, api_key="s3cret").embeddings.create(model="tiny-embed", input="x")
        assert len(answer.data) == 1


def test_tei_embed_normalizes_as_asked_and_truncates_only_when_asked(
    service: GunicornService, tiny_run: TinyRun
) -> None:
    model = runtime(tiny_run, "tiny-embed")
    rows = model.token_ids(TEXTS)
    for normalize in (True, False):
        reply = service.request("POST", "/embed", {"inputs": TEXTS, "normalize": normalize})
        assert reply.status == 200
        assert np.allclose(reply.body, model.run(rows, normalize=normalize), atol=1e-6)
    one = service.request("POST", "/embed", {"inputs": TEXTS[0]}).body
    assert len(one) == 1 and abs(np.linalg.norm(one[0]) - 1) < 1e-5  # TEI's default: normalized
    long = "word " * 400
    refused = service.request("POST", "/embed", {"inputs": [long]})
    assert (
        refused.status == 422
        and refused.body["error_type"] == "Validation"
        and set(refused.body)
        == {
            "error",
            "error_type",
        }
    )
    assert service.request("POST", "/embed", {"inputs": [long], "truncate": True}).status == 200


def test_tei_predict_single_batch_raw_scores_and_pairs(service: GunicornService) -> None:
    scores = native(service, "/api/classify", TEXTS[:2], "tiny-clf")["results"]
    alone = native(service, "/api/classify", TEXTS[:1], "tiny-clf")["results"]  # one text: as the run it is in
    single = service.request("POST", "/predict", {"inputs": TEXTS[0]}).body
    assert [p["score"] for p in single] == sorted((p["score"] for p in single), reverse=True)
    assert {p["label"]: p["score"] for p in single} == pytest.approx(alone[0]["scores"], abs=1e-6)
    batch = service.request("POST", "/predict", {"inputs": [[TEXTS[0]], [TEXTS[1]]]}).body
    assert len(batch) == 2
    for row, expected in zip(batch, scores, strict=True):
        assert {p["label"]: p["score"] for p in row} == pytest.approx(expected["scores"], abs=1e-6)
    raw = service.request("POST", "/predict", {"inputs": [TEXTS[0]], "raw_scores": True}).body
    logits = np.array([p["score"] for p in raw])
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose(softmax, [p["score"] for p in single], atol=1e-6)
    pair = service.request("POST", "/predict", {"inputs": ["a premise", "a hypothesis"]})
    assert pair.status == 422 and "pairs" in pair.body["error"] and pair.body["error_type"] == "Validation"


def test_tei_info_health_and_errors(service: GunicornService, tiny_run: TinyRun) -> None:
    info = service.request("GET", "/info").body
    limits = load_approved(tiny_run.artifacts / "tiny-embed").manifest["limits"]
    assert info["model_id"] == "tiny-embed" and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_client_batch_size"] == limits["max_batch"] and info["max_input_length"] == limits["max_seq_len"]
    assert info["max_batch_tokens"] == limits["max_tokens_per_run"] and info["auto_truncate"] is False
    health = service.request("GET", "/health")
    assert health.status == 200 and health.raw == b""
    empty = service.request("POST", "/embed", {"inputs": []})
    assert empty.status == 400 and empty.body["error_type"] == "Empty"
    assert service.request("POST", "/embed", {"inputs": ["x"] * 9}).status == 422  # max_batch, as /api/embed
    unknown = service.request("POST", "/embed", {"inputs": "x", "prompt": "y"})
    assert unknown.status == 422 and "unknown field" in unknown.body["error"]
    big = service.request("POST", "/embed", raw=b'{"inputs": "' + b"x" * (2 << 20) + b'"}')
    assert big.status == 413 and big.body["error_type"] == "Validation"
