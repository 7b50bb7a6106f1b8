"""Property tests of the request parser and config loader, and schemathesis against the live service."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ModelConfig
from pipeline.memory.harness import GunicornService
from serve.app import parse_json, read_body
from serve.config import ConfigError, Limits, ServiceConfig, load_config
from serve.errors import ServiceError
from serve.inputs import check_text, parse_inputs
from tests.conftest import TinyRun

pytestmark = pytest.mark.reliability
LIMITS = Limits(max_batch=8, max_seq_len=64, max_body_bytes=4096)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(st.binary(max_size=6000))
def test_any_body_is_parsed_or_refused_with_a_4xx(body: bytes) -> None:
    environ = {"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
    try:
        _model, inputs = parse_inputs(parse_json(read_body(environ, LIMITS.max_body_bytes)), LIMITS)
        for index, text in enumerate(inputs):
            check_text(index, text)  # emptiness and Unicode hygiene are checked here now
    except ServiceError as exc:
        assert 400 <= exc.status < 500 and exc.message
        return
    assert 1 <= len(inputs) <= LIMITS.max_batch and all(isinstance(i, str) and i.strip() for i in inputs)


@given(json_values)
def test_any_json_payload_is_accepted_only_when_well_formed(payload: object) -> None:
    try:
        model, _inputs = parse_inputs(payload, LIMITS)
    except ServiceError as exc:
        assert exc.status in (400, 422)
        return
    assert isinstance(payload, dict) and set(payload) <= {"model", "inputs"}
    assert model is None or isinstance(model, str)


@given(st.integers(min_value=0, max_value=20_000))
def test_body_limit_holds_without_content_length(size: int) -> None:
    environ = {"wsgi.input": io.BytesIO(b"x" * size)}
    try:
        assert len(read_body(environ, LIMITS.max_body_bytes)) == size <= LIMITS.max_body_bytes
    except ServiceError as exc:
        assert exc.status == 413 and size > LIMITS.max_body_bytes


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values)
def test_config_loader_never_crashes(tmp_path: Path, data: object) -> None:
    path = tmp_path / "any.yaml"
    path.write_text(yaml.safe_dump(data))
    for model_cls in (ServiceConfig, ModelConfig):
        try:
            load_config(path, model_cls)
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: ") and "\n" not in message


@pytest.fixture(scope="module")
def live(tiny_run: TinyRun) -> Iterator[GunicornService]:
    with GunicornService(tiny_run.service) as service:
        yield service


def test_openapi_no_server_errors(live: GunicornService) -> None:
    """Every operation of /openapi.json, with schema-generated (and mutated) requests: never a 5xx."""
    api = schemathesis.openapi.from_url(f"http://127.0.0.1:{live.port}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 11  # /api/*, and OpenAI's and TEI's routes

    for operation in operations:

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def no_server_error(case: schemathesis.Case) -> None:
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"

        no_server_error()
