"""One request must not break the fit: the real MiniLM service under gunicorn, sent the largest bodies
it accepts in their nastiest forms, by hand and by hypothesis. Every answer is a JSON 200 or 4xx, and
the worker's VmHWM stays within 5% of the peak the approval proves (the proof includes these bodies)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.memory.cgroup import MemoryCgroup, unavailable_reason
from pipeline.memory.harness import GunicornService
from serve.artifacts import load_approved
from serve.config import load_service_config
from serve.memory import status_mb
from serve.probe import hostile_bodies
from tests.conftest import MinilmRun
from tests.helpers import REPO

pytestmark = pytest.mark.reliability
SERVICE = REPO / "configs" / "service.yaml"
PROOF_SLACK = 1.05  # a real worker may exceed the one-process proof by at most 5%
BOMB = json.dumps({"inputs": ["!" * 1_000_000]}).encode()


def proven_peak(run: MinilmRun) -> float:
    return float(load_approved(run.artifacts / "minilm").manifest["metrics"]["peak_rss_mb"])


def worker_hwm(service: GunicornService) -> float:
    return status_mb("VmHWM", service.worker_pids()[0])


@pytest.fixture(scope="module", params=[False, True], ids=["truncate-off", "truncate-on"])
def served(request: pytest.FixtureRequest, minilm_run: MinilmRun) -> Iterator[tuple[GunicornService, bool]]:
    """The service inside a memory cgroup limited to the budget, as a container host runs it: a request
    that broke the fit would be an OOM kill here. Without a cgroup (not root), the VmHWM checks remain."""
    env = {**minilm_run.env, "TRUNCATE": "true" if request.param else "false"}
    config, _ = load_service_config(SERVICE)
    reason = unavailable_reason()
    with contextlib.ExitStack() as stack:
        group = None if reason else stack.enter_context(MemoryCgroup(config.budget_mb))
        with GunicornService(SERVICE, env=env, cgroup=group) as service:
            yield service, request.param
        if group is None:
            print(f"no cgroup check: {reason}")
            return
        figures = group.figures()
        print(
            f"cgroup (limit {figures.limit_mb:.0f} MB): peak {figures.peak_mb} MB, failcnt {figures.failcnt}, "
            f"OOM kills {figures.oom_kills}"
        )
        assert figures.oom_kills == 0 and figures.peak_mb <= config.budget_mb


def test_a_million_characters_are_answered_fast_within_the_proof(
    served: tuple[GunicornService, bool], minilm_run: MinilmRun
) -> None:
    service, truncate = served
    before = worker_hwm(service)
    reply = service.request("POST", "/api/embed", raw=BOMB)
    after = worker_hwm(service)
    proven = proven_peak(minilm_run)
    print(
        f"1,000,000 '!' (TRUNCATE={truncate}): {reply.status} in {reply.seconds * 1000:.0f} ms, "
        f"worker VmHWM {before:.1f} -> {after:.1f} MB, proven {proven:.1f} MB"
    )
    if truncate:
        assert reply.status == 200 and len(reply.body["embeddings"]) == 1
    else:
        assert reply.status == 422
        assert reply.body["error"]["limit"] == "max_input_chars"
        assert reply.body["error"]["message"].startswith("inputs[0] has 1,000,000 characters, over max_input_chars")
        assert reply.seconds < 0.5  # refused on its length, never tokenized
    assert after <= proven * PROOF_SLACK


def test_every_hostile_shape_is_answered_within_the_proof(
    served: tuple[GunicornService, bool], minilm_run: MinilmRun
) -> None:
    service, truncate = served
    config, _ = load_service_config(SERVICE)
    limits = config.limits
    max_input_chars = service.request("GET", "/api/models").body["models"][0]["limits"]["max_input_chars"]
    proven = proven_peak(minilm_run)
    rows = []
    for _ in range(2):  # the mix over many requests: allocators grow with the variety of shapes
        for name, body in hostile_bodies(limits.max_batch, limits.max_body_bytes, max_input_chars):
            before = worker_hwm(service)
            reply = service.request("POST", "/api/embed", raw=body)
            rows.append((name, reply.status, reply.seconds, before, worker_hwm(service)))
            assert reply.status in (200, 422), (name, reply.body)
            assert isinstance(reply.body, dict)
    for name, status, seconds, before, after in rows:
        print(f"TRUNCATE={truncate} | {name} | {status} | {seconds * 1000:.0f} ms | {before:.1f} -> {after:.1f} MB")
    assert max(row[4] for row in rows) <= proven * PROOF_SLACK, f"proven {proven} MB"


def hostile_text(max_chars: int) -> st.SearchStrategy[str]:
    """Any Unicode category, lone surrogates included, as short texts or as long runs of one piece."""
    piece = st.text(st.characters(exclude_categories=()), min_size=1, max_size=8)
    run = st.builds(lambda unit, count: unit * count, piece, st.integers(1, max_chars // 8))
    return st.one_of(st.text(st.characters(exclude_categories=()), max_size=64), run)


def hostile_payload(max_batch: int, max_chars: int) -> st.SearchStrategy[bytes]:
    texts = st.lists(hostile_text(max_chars), min_size=1, max_size=max_batch + 2)
    inputs = texts.map(lambda items: json.dumps({"inputs": items}).encode())
    nested = st.integers(1, 200_000).map(lambda depth: b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}")
    raw = texts.map(lambda items: json.dumps({"inputs": items}, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return st.one_of(inputs, nested, raw)


def test_hypothesis_hostile_bodies_get_json_answers_within_the_proof(minilm_run: MinilmRun) -> None:
    config, _ = load_service_config(SERVICE)
    limits = config.limits
    proven = proven_peak(minilm_run)
    statuses: dict[int, int] = {}
    with GunicornService(SERVICE, env={**minilm_run.env, "TRUNCATE": "true"}) as service:
        max_chars = limits.max_body_bytes // 4

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=hostile_payload(limits.max_batch, max_chars))
        def answered(body: bytes) -> None:
            if len(body) > limits.max_body_bytes:
                body = body[: limits.max_body_bytes]  # cut bodies are malformed JSON: a 400 is due
            reply = service.request("POST", "/api/embed", raw=body)
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
            assert reply.status == 200 or 400 <= reply.status < 500, reply.body
            assert isinstance(reply.body, dict), reply.body

        answered()
        hwm = worker_hwm(service)
    print(f"hypothesis: statuses {statuses}, worker VmHWM {hwm:.1f} MB, proven {proven:.1f} MB")
    assert hwm <= proven * PROOF_SLACK
