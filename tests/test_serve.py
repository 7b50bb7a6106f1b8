"""The service under real gunicorn (1 worker, 127.0.0.1) on the tiny approved artifacts: endpoints,
limits and errors, planner, API key, and that serve/ never imports the build stack."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import IterUnreader
from prometheus_client.parser import text_string_to_metric_families

from pipeline.memory.harness import GunicornService
from serve import worker
from serve.apis.native import NativeApi
from serve.apis.openai import OpenAIApi
from serve.apis.tei import TeiApi
from serve.artifacts import load_approved
from serve.config import SessionSettings
from serve.loader import session_settings
from serve.runtime import ModelRuntime
from serve.watchdog import RUN_DIR_ENV, Watchdog
from serve.worker import ClientTooSlow
from tests.conftest import TinyRun
from tests.helpers import REPO, memfit

ROUTES = {"unmatched", *(rule.rule for api in (NativeApi(), OpenAIApi(), TeiApi()) for rule in api.rules())}


@pytest.fixture(scope="module")
def service(tiny_run: TinyRun) -> Iterator[GunicornService]:
    with GunicornService(tiny_run.service) as running:
        yield running


def worker_answers_ok(service: GunicornService, pid: int) -> None:
    reply = service.request("GET", "/api/health")
    assert reply.status == 200 and reply.body["pid"] == pid


def test_health_ready_models_openapi(service: GunicornService) -> None:
    health = service.request("GET", "/api/health").body
    assert health["status"] == "ok" and set(health["models"]) == {"tiny-embed", "tiny-clf"}
    assert health["rss_mb"] > 0 and health["allocator_pinned"] is True
    assert health["watchdog"]["recycles"] == 0
    assert service.request("GET", "/api/ready").body == {"ready": True, "models": ["tiny-clf", "tiny-embed"]}
    models = service.request("GET", "/api/models").body["models"]
    assert {m["name"]: m["task"] for m in models} == {
        "tiny-embed": "feature-extraction",
        "tiny-clf": "text-classification",
    }
    assert all("peak_rss_mb" in m["metrics"] for m in models)
    spec = service.request("GET", "/openapi.json").body
    assert spec["openapi"].startswith("3.") and {"/api/embed", "/api/classify", "/api/ready"} <= set(spec["paths"])


def test_embeddings_match_the_evaluated_artifact(service: GunicornService, tiny_run: TinyRun) -> None:
    texts = ["a quiet, funny film", "the worst sequel of the year", "fine"]
    reply = service.request("POST", "/api/embed", {"inputs": texts})
    assert reply.status == 200 and reply.body["model"] == "tiny-embed"
    served = np.array(reply.body["embeddings"])
    artifact = load_approved(tiny_run.artifacts / "tiny-embed")
    runtime = ModelRuntime(
        artifact.folder, SessionSettings.model_validate(artifact.manifest["session_options"]), 64, 512
    )
    expected = runtime.embed(texts)
    cosine = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999


def test_classify_returns_label_and_scores(service: GunicornService) -> None:
    reply = service.request("POST", "/api/classify", {"inputs": ["great", "awful"], "model": "tiny-clf"})
    assert reply.status == 200
    for result in reply.body["results"]:
        assert result["label"] in ("rotten", "fresh")
        assert abs(sum(result["scores"].values()) - 1) < 1e-5


BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [', 400, "bad_request"),
    ("invalid UTF-8", b'{"inputs": ["\xff\xfe"]}', 400, "bad_request"),
    ("not an object", b'["a"]', 400, "bad_request"),
    ("empty list", b'{"inputs": []}', 400, "empty"),
    ("deeply nested", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "bad_request"),
    ("non-string item", b'{"inputs": ["ok", 3]}', 422, "unprocessable"),
    ("empty string", b'{"inputs": [""]}', 422, "unprocessable"),
    ("too many inputs", json.dumps({"inputs": ["x"] * 9}).encode(), 422, "unprocessable"),
    ("10k empty strings", json.dumps({"inputs": [""] * 10_000}).encode(), 422, "unprocessable"),
    ("too long", json.dumps({"inputs": ["word " * 200]}).encode(), 422, "unprocessable"),
    ("unknown model", b'{"inputs": ["x"], "model": "nope"}', 404, "not_found"),
    ("wrong task", b'{"inputs": ["x"], "model": "tiny-clf"}', 422, "unprocessable"),
]


@pytest.mark.parametrize(("raw", "status", "code"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_json_errors_and_the_worker_survives(
    service: GunicornService, raw: bytes, status: int, code: str
) -> None:
    pid = service.worker_pids()[0]
    reply = service.request("POST", "/api/embed", raw=raw)
    assert reply.status == status, reply.body
    assert reply.body["error"]["code"] == code and reply.body["error"]["message"]
    worker_answers_ok(service, pid)


def test_limits_are_named(service: GunicornService) -> None:
    reply = service.request("POST", "/api/embed", {"inputs": ["x"] * 9})
    assert reply.body["error"]["message"] == "9 inputs exceed max_batch (8)"
    reply = service.request("POST", "/api/embed", {"inputs": ["fine", "word " * 200]})
    expected = "inputs[1] has 208 tokens, over max_seq_len (64); shorten it or set TRUNCATE=true"
    assert reply.body["error"]["message"] == expected


def raw_status(port: int, head: bytes, chunks: list[bytes]) -> int:
    """Send a whole request over a plain socket before reading, as most clients do; return the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head)
        for chunk in chunks:
            connection.sendall(chunk)
        answer = connection.recv(65536)
    return int(answer.split(b" ", 2)[1])


def test_oversized_body_is_413_with_and_without_content_length(service: GunicornService) -> None:
    pid = service.worker_pids()[0]
    before = service.request("GET", "/api/health").body["rss_mb"]
    big = b'{"inputs": ["' + b"a" * 4_000_000 + b'"]}'
    json_type = "Content-Type: application/json\r\n"
    sized = f"POST /api/embed HTTP/1.1\r\nHost: x\r\n{json_type}Content-Length: {len(big)}\r\n\r\n".encode()
    assert raw_status(service.port, sized, [big]) == 413
    head = (
        b"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    pieces = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    chunks = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]
    assert raw_status(service.port, head, chunks) == 413
    worker_answers_ok(service, pid)
    after = service.request("GET", "/api/health").body["rss_mb"]
    assert after - before < 8, f"RSS grew from {before} to {after} MB after refused bodies"


@pytest.mark.parametrize(
    ("path", "content_type", "sizes", "status"),
    [
        ("/embed", "application/json", (1_048_577, 2 << 20, 8 << 20, 3_000_001), 413),  # over max_body_bytes
        ("/api/embed", "text/plain", (900_000, 1 << 20), 415),  # refused before the body is read
        ("/nope", "application/json", (1 << 20,), 404),
    ],
)
def test_a_client_that_sends_before_reading_gets_its_refusal_and_keeps_its_connection(
    service: GunicornService, path: str, content_type: str, sizes: tuple[int, ...], status: int
) -> None:
    """http.client sends the whole body before it reads: an answer given before the body was read must
    still reach it, never a reset, and the connection serves the next request."""
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        for size in sizes:
            connection.request("POST", path, body=b"x" * size, headers={"Content-Type": content_type})
            reply = connection.getresponse()
            assert (reply.status, reply.getheader("Connection")) == (status, "keep-alive"), size
            assert json.loads(reply.read())
        connection.request("POST", "/embed", body=b'{"inputs": "fine"}', headers={"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_a_body_too_long_to_throw_away_is_answered_and_its_connection_closed(service: GunicornService) -> None:
    length = worker.MAX_DISCARD_BYTES + 1
    head = f"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    answer = b""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as connection:
        connection.sendall(head.encode() + b"x" * 1000)
        while received := connection.recv(65536):  # to the end: the worker closes without waiting
            answer += received
    assert answer.startswith(b"HTTP/1.1 413 ") and b"\r\nConnection: close\r\n" in answer


def arriving(chunks: list[bytes], then_too_slow: bool, taken: list[bytes]) -> Iterator[bytes]:
    """A client's body as the worker's socket yields it (into `taken` too), ending in READ_TIMEOUT if
    `then_too_slow`."""
    for chunk in chunks:
        taken.append(chunk)
        yield chunk
    if then_too_slow:
        raise ClientTooSlow()


@pytest.mark.parametrize(
    ("length", "sent", "too_slow", "ended", "read"),
    [
        (10_000, 10_000, False, True, 10_000),  # thrown away to its end: the connection can stay open
        (10_000, 6000, True, False, 6000),  # not sent within READ_TIMEOUT: closed with what arrived
        (12_001, 12_001, False, False, 0),  # declared over MAX_DISCARD_BYTES: closed unread
    ],
)
def test_an_unread_body_is_discarded_only_within_its_bounds(
    monkeypatch: pytest.MonkeyPatch, length: int, sent: int, too_slow: bool, ended: bool, read: int
) -> None:
    monkeypatch.setattr(worker, "MAX_DISCARD_BYTES", 12_000)
    monkeypatch.setattr(worker, "DISCARD_STEP", 1000)
    chunks = [b"x" * 500] * (sent // 500) + [b"x" * (sent % 500)]
    taken: list[bytes] = []
    body = Body(LengthReader(IterUnreader(arriving(chunks, too_slow, taken)), length))
    assert worker.discard(body) is ended
    assert sum(map(len, taken)) == read


def test_a_body_that_failed_to_parse_is_not_read_again() -> None:
    body = Body(LengthReader(IterUnreader([b"x" * 100]), 100))
    body.failed = True
    assert worker.discard(body) is False and body.reader.length == 100


def test_unknown_route_and_method(service: GunicornService) -> None:
    assert service.request("GET", "/nope").status == 404
    reply = service.request("GET", "/api/embed")
    assert reply.status == 405 and reply.headers["Allow"] == "POST"
    assert service.request("POST", "/api/health", {}).headers["Allow"] == "GET, HEAD"
    for path in ("/api//embed", "/api/embed/", "/api/embed//", "//api/embed"):  # never a redirect
        reply = service.request("POST", path, {"inputs": ["x"]})
        assert not 300 <= reply.status < 400 and "Location" not in reply.headers, (path, reply.status)
        assert reply.status == (200 if path == "//api/embed" else 404), path  # leading slashes are one root


HYGIENE = [
    (
        "lone surrogate",
        b'{"inputs": ["fine", "ok \\udfff"]}',
        422,
        "inputs[1] is not valid Unicode: lone surrogate U+DFFF",
    ),
    (
        "zero-width only",
        '{"inputs": ["\u200b\u200c\u2060\ufeff"]}'.encode(),
        422,
        "inputs[0] has no visible characters",
    ),
    ("controls only", b'{"inputs": ["\\u0000\\u0007\\t\\n"]}', 422, "inputs[0] has no visible characters"),
    ("combining marks only", '{"inputs": ["\u0301\u0302"]}'.encode(), 422, "inputs[0] has no visible characters"),
    ("ideographic spaces", '{"inputs": ["\u3000\u00a0 "]}'.encode(), 422, "inputs[0] has no visible characters"),
]


@pytest.mark.parametrize(("raw", "status", "message"), [h[1:] for h in HYGIENE], ids=[h[0] for h in HYGIENE])
def test_input_hygiene(service: GunicornService, raw: bytes, status: int, message: str) -> None:
    reply = service.request("POST", "/api/embed", raw=raw)
    assert reply.status == status and reply.body["error"]["message"].startswith(message), reply.body
    visible = service.request("POST", "/api/embed", {"inputs": ["\u200b😀", "é", "記"]})
    assert visible.status == 200


def test_content_type_must_be_json(service: GunicornService) -> None:
    """A text/plain or form POST needs no CORS preflight: any page a visitor opens could send one."""
    body = json.dumps({"inputs": ["x"]}).encode()
    for declared in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", None):
        headers = {"Content-Type": declared} if declared else {"Content-Type": ""}
        reply = service.request("POST", "/api/embed", raw=body, headers=headers)
        assert reply.status == 415 and reply.body["error"]["code"] == "unsupported_media_type", declared
    for declared in ("application/json", "application/json; charset=utf-8", "Application/JSON; charset=UTF-8"):
        assert service.request("POST", "/api/embed", raw=body, headers={"Content-Type": declared}).status == 200


def test_echoed_values_are_cut_and_api_responses_are_not_cached(service: GunicornService) -> None:
    name = "m" * 900_000
    reply = service.request("POST", "/api/embed", {"inputs": ["x"], "model": name})
    assert reply.status == 404 and len(reply.raw) < 1000 and "(900,000 characters)" in reply.body["error"]["message"]
    reply = service.request("POST", "/api/embed", {"inputs": ["x"], "k" * 5000: 1})
    assert reply.status == 422 and len(reply.raw) < 1000
    for method, path in [("GET", "/api/health"), ("POST", "/api/embed"), ("GET", "/nope")]:
        reply = service.request(method, path, {"inputs": ["x"]} if method == "POST" else None)
        assert reply.headers["X-Content-Type-Options"] == "nosniff" and reply.headers["Cache-Control"] == "no-store"


def test_api_key_protects_everything_but_health_and_ready(tiny_run: TinyRun) -> None:
    with GunicornService(tiny_run.service, env={"API_KEY": "s3cret"}) as keyed:
        for method, path, body in [
            ("GET", "/api/models", None),
            ("POST", "/api/embed", {"inputs": ["x"]}),
            ("POST", "/api/classify", {"inputs": ["x"]}),
            ("GET", "/metrics", None),
        ]:
            assert keyed.request(method, path, body).status == 401
            assert keyed.request(method, path, body, headers={"Authorization": "Bearer wrong"}).status == 401
            assert keyed.request(method, path, body, headers={"Authorization": "Bearer s3cret"}).status == 200
        assert keyed.request("GET", "/api/health").status == 200
        assert keyed.request("GET", "/api/ready").status == 200


def test_limits_below_the_proof_are_enforced_and_above_it_refused(tiny_run: TinyRun) -> None:
    """An operator may lower a proven limit (here the characters per request); raising one past what the
    approval proves leaves the model unserved, naming the limit."""
    with GunicornService(tiny_run.service, env={"MAX_REQUEST_CHARS": "20"}) as lowered:
        reply = lowered.request("POST", "/api/embed", {"inputs": ["a" * 15, "b" * 15]})
        assert reply.status == 422 and reply.body["error"]["limit"] == "max_request_chars"
        assert reply.body["error"]["message"] == "the request has 30 characters, over max_request_chars (20)"
    with GunicornService(tiny_run.service, env={"MAX_BODY_BYTES": "4194304"}, wait_ready=False) as raised:
        reply = raised.request("GET", "/api/ready")
        assert (
            reply.status == 503 and "max_body_bytes 4,194,304 exceeds the 1,048,576" in reply.body["error"]["message"]
        )


def test_planner_refuses_workers_that_do_not_fit(tiny_run: TinyRun) -> None:
    env = {"MEMORY_BUDGET_MB": "150", "WORKERS": "4"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "serve/gunicorn.conf.py",
            "--bind",
            "127.0.0.1:0",
            "serve.app:create_app()",
        ],
        cwd=REPO,
        env={**os.environ, "SERVICE_CONFIG": str(tiny_run.service), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    line = next(line for line in done.stderr.splitlines() if line.startswith("WORKERS=4"))
    assert "(measured with 4 workers at " in line and "budget 150 MB fits at most" in line
    plan = memfit("plan", "--service", str(tiny_run.service), "--workers", "4", env={**os.environ, **env})
    assert plan.returncode == 1 and plan.stdout.splitlines()[-1].startswith("WORKERS=4 needs ~")
    assert plan.stdout.startswith("workers | tokens/run | predicted MB")


def test_workers_auto_starts_the_most_that_fit(tiny_run: TinyRun) -> None:
    fit = json.loads((tiny_run.artifacts / "service-fit.json").read_text())
    cost = [run["planned_mb"] for run in fit["runs"]]
    budget = (cost[1] + cost[2]) / 2  # two workers fit, three do not
    with GunicornService(tiny_run.service, env={"WORKERS": "auto", "MEMORY_BUDGET_MB": f"{budget:.0f}"}) as service:
        assert service.wait_for_workers(2) == 2
        assert "WORKERS=2 needs" in service.log()
        threads = service.request("GET", "/api/health").body["intra_op_threads"]
    # The cores are split between the workers, never above what the approvals measured.
    cores = len(os.sched_getaffinity(0))
    for name, used in threads.items():
        approved = load_approved(tiny_run.artifacts / name).manifest["session_options"]["intra_op_num_threads"]
        assert used == min(approved or cores, max(1, cores // 2))


@pytest.mark.parametrize(
    ("approved", "configured", "used"),
    [
        (2, None, 2),
        (2, 1, 1),
        (2, 4, 2),
        (0, None, 0),
        pytest.param(0, 1, 1, marks=pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core")),
    ],
)
def test_session_threads_are_lowered_never_raised(approved: int, configured: int | None, used: int) -> None:
    settings = session_settings(SessionSettings(intra_op_num_threads=approved).model_dump(), configured)
    assert settings.intra_op_num_threads == used


def test_a_bad_workers_value_is_a_one_line_error(tiny_run: TinyRun) -> None:
    with pytest.raises(RuntimeError, match="memfit serve: WORKERS='two': must be a positive integer or auto"):
        GunicornService(tiny_run.service, env={"WORKERS": "two"}).start()


def test_serve_never_imports_the_build_stack(tiny_run: TinyRun) -> None:
    code = (
        "import sys; from serve.app import create_app; app = create_app(sys.argv[1]); "
        "assert not app.failures, app.failures; "
        "print([m for m in ('torch', 'transformers', 'optimum', 'sklearn', 'onnx') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_run.service)], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_bad_watchdog_margin_is_a_one_line_error(tiny_run: TinyRun) -> None:
    code = "import sys; from serve.app import create_app; create_app(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_run.service)],
        cwd=REPO,
        env={**os.environ, "WATCHDOG_MARGIN_PCT": "-1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "memfit serve: WATCHDOG_MARGIN_PCT must be a number of 0 or more (got '-1')"


def test_concurrent_requests_over_the_limit_recycle_the_worker_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests finishing together on several threads all see the same RSS: one recycle is recorded."""
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    watchdog = Watchdog(proven_peak_mb=1.0, margin_pct=0)  # any running interpreter is over 1 MB
    start = threading.Barrier(8)

    def finish_request() -> float | None:
        start.wait()
        return watchdog.over_limit()

    with ThreadPoolExecutor(8) as threads:
        seen = list(threads.map(lambda _: finish_request(), range(8)))
    assert sum(rss is not None for rss in seen) == 1
    assert watchdog.status()["recycles"] == 1 and watchdog.status()["last_recycle"]["pid"] == os.getpid()


def metric_samples(service: GunicornService) -> dict[str, list[Any]]:
    """GET /metrics parsed with prometheus_client's own parser: samples by name."""
    reply = service.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(reply.raw.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if labels.items() <= s.labels.items())


def test_metrics_count_requests_tokens_and_memory(service: GunicornService, tiny_run: TinyRun) -> None:
    before = metric_samples(service)
    texts = ["a quiet, funny film", "the plot goes nowhere"]
    for _ in range(3):
        assert service.request("POST", "/api/embed", {"inputs": texts}).status == 200
    assert service.request("POST", "/api/embed", {"inputs": []}).status == 400
    after = metric_samples(service)
    ok = {"route": "/api/embed", "model": "tiny-embed", "status": "200"}
    assert value(after, "memfit_requests_total", **ok) - value(before, "memfit_requests_total", **ok) == 3
    refused = {"route": "/api/embed", "status": "400"}
    assert value(after, "memfit_requests_total", **refused) - value(before, "memfit_requests_total", **refused) == 1
    assert value(after, "memfit_request_duration_seconds_count", **ok) >= 3
    artifact = load_approved(tiny_run.artifacts / "tiny-embed")
    runtime = ModelRuntime(artifact.folder, SessionSettings(), max_seq_len=64, max_tokens_per_run=4096)
    tokens = 3 * sum(map(len, runtime.token_ids(texts)))
    model = {"model": "tiny-embed"}
    assert value(after, "memfit_tokens_total", **model) - value(before, "memfit_tokens_total", **model) == tokens
    assert value(after, "memfit_session_runs_total", model="tiny-embed") >= 3
    health = service.request("GET", "/api/health").body
    assert value(after, "memfit_worker_rss_mb") > 0 and value(after, "memfit_worker_pss_mb") > 0
    assert value(after, "memfit_worker_proven_peak_mb") == health["watchdog"]["proven_peak_mb"]
    assert value(after, "memfit_watchdog_recycles") == health["watchdog"]["recycles"]
    assert not [s for s in after["memfit_requests_total"] if s.labels["route"] not in ROUTES], "raw paths as labels"
    service.request("GET", "/no/such/route/" + "x" * 50)
    assert {s.labels["route"] for s in metric_samples(service)["memfit_requests_total"]} <= ROUTES


def test_metrics_of_several_workers_are_one_view(tiny_run: TinyRun) -> None:
    """With two workers any worker's /metrics counts every worker's requests (multiprocess mode)."""
    with GunicornService(tiny_run.service, env={"WORKERS": "2", "PLAN_CHECK": "skip"}) as two:
        assert two.wait_for_workers(2) == 2
        pids = set()
        for _ in range(20):  # a new connection each: both workers answer some
            reply = two.request("POST", "/api/embed", {"inputs": ["x"]})
            assert reply.status == 200
            pids.add(two.request("GET", "/api/health").body["pid"])
        assert len(pids) == 2
        for _ in range(4):
            samples = metric_samples(two)
            assert value(samples, "memfit_requests_total", route="/api/embed", status="200") == 20
        assert {s.labels["pid"] for s in samples["memfit_worker_rss_mb"]} == {str(p) for p in two.worker_pids()}
