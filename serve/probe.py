"""Peak-memory probe: a fresh process that imports only what a service worker imports, loads model
folders the way the service does, runs requests of rising ragged shapes, the worst-case input the
service accepts, then requests of shorter inputs: a worker's allocators grow with the variety of shapes
it runs, not only with the largest.
For the proof of an approval it then sends the largest bodies the service accepts, in their nastiest
forms, through the service's own request path (`request_path`), with THREADS - 1 bodies held as if
waiting for the inference lock: the proven peak covers the request path, not only the model.

Usage: python -m serve.probe SPEC_JSON  (prints one JSON line). The pipeline calls this for every
candidate; it never measures inside its own process.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serve.memory import pin_allocator, status_mb

FORBIDDEN_MODULES = ("torch", "transformers", "optimum", "sklearn")
WORST_CASE_WORD = "memory"
CHILD_FLAG = "--measure"


def worst_case_texts(batch: int, seq_len: int) -> list[str]:
    """`batch` texts that each tokenize past `seq_len`, so truncation yields full-length rows."""
    return [" ".join([WORST_CASE_WORD] * (seq_len + 8))] * batch


def shape_history(max_batch: int, seq_len: int) -> list[list[str]]:
    """Requests of ragged rows (each three tokens shorter than the one before) at longest lengths rising
    from a quarter of `seq_len` to all of it. ONNX Runtime's arena keeps the chunks it carved for every
    shape a worker ran, and a later worst case extends past them: mpnet peaked 33 MB higher on its worst
    case after these than on the worst case alone, and 37 MB after 320 real reviews. The probe and the
    service fit send them before the worst case."""
    step = max(1, seq_len // 8)
    return [
        [" ".join([WORST_CASE_WORD] * max(1, longest - 2 - 3 * row)) for row in range(max_batch)]
        for longest in range(max(1, seq_len // 4), seq_len + 1, step)
    ]


def sweep_requests(max_batch: int, seq_len: int) -> list[list[str]]:
    """Largest requests of shorter inputs (an eighth, a quarter and half of `seq_len` tokens): the
    service runs them in micro-batches of other shapes than the worst case's."""
    return [[" ".join([WORST_CASE_WORD] * max(1, seq_len // part - 2))] * max_batch for part in (8, 4, 2)]


# (name, repeated unit, texts per body): every body is filled to max_body_bytes with raw UTF-8.
HOSTILE_SHAPES: tuple[tuple[str, str, str], ...] = (
    ("one huge input", "!", "one"),
    ("max_batch huge inputs", "!", "batch"),
    ("punctuation runs", "!?.,;:-'\"()[]", "batch"),
    ("one long word", "a", "one"),
    ("CJK", "記憶体の限界を測る", "batch"),
    ("Thai and Devanagari", "ความจำसीमा", "batch"),
    ("Arabic", "الذاكرة المحدودة ", "batch"),
    ("emoji and ZWJ sequences", "👩\u200d👩\u200d👧\u200d👦🏳️\u200d🌈", "batch"),
    ("combining marks", "e\u0301\u0302\u0303", "batch"),
)


def fill(unit: str, budget: int) -> str:
    """`unit` repeated as often as fits `budget` bytes once written as a JSON string in UTF-8."""
    return unit * (budget // len(json.dumps(unit, ensure_ascii=False)[1:-1].encode()))


def hostile_bodies(
    max_batch: int, max_body_bytes: int, max_input_chars: int, model: str | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, body) for the bodies that work the request path hardest, each at most `max_body_bytes`: the
    shapes above filling the body, and `max_batch` inputs of `max_input_chars` one-token characters (the
    most tokenizing an input within the character limit can cost). Built one at a time, so the probe
    holds no more bodies than a worker would."""
    named = {} if model is None else {"model": model}
    for name, unit, count in HOSTILE_SHAPES:
        texts = 1 if count == "one" else max_batch
        overhead = len(json.dumps(named | {"inputs": [""] * texts}))
        text = fill(unit, (max_body_bytes - overhead) // texts)
        yield name, json.dumps(named | {"inputs": [text] * texts}, ensure_ascii=False).encode()
    dense = json.dumps(named | {"inputs": ["!" * max_input_chars] * max_batch}).encode()
    if len(dense) <= max_body_bytes:
        yield "max_batch inputs at max_input_chars", dense


def send_bodies(service: Any, path: str, bodies: Iterator[tuple[str, bytes]]) -> dict[int, int]:
    """Each body through the service's WSGI request path; counts of the status codes it answered."""
    from werkzeug.test import EnvironBuilder

    statuses: dict[int, int] = {}
    for _, body in bodies:
        environ = EnvironBuilder(path=path, method="POST", data=body, content_type="application/json").get_environ()
        answered: list[str] = []

        def start_response(status: str, headers: Any, exc_info: Any = None, sink: list[str] = answered) -> None:
            sink.append(status)

        for _ in service(environ, start_response):
            pass
        code = int(answered[0].split()[0])
        statuses[code] = statuses.get(code, 0) + 1
    return statuses


def request_path(runtimes: list[Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Every model's hostile bodies, TRUNCATE off and on, twice over (a mix of shapes over many requests),
    while THREADS - 1 full bodies wait as they would for the inference lock."""
    from serve.apis.native import INFERENCE_PATHS
    from serve.app import Service
    from serve.config import Limits
    from serve.loader import ServedModel

    limits = Limits(**spec["limits"])
    models = {
        f"model-{index}": ServedModel(f"model-{index}", runtime, runtime.folder.name, {})
        for index, runtime in enumerate(runtimes)
    }
    waiting = [b" " * limits.max_body_bytes for _ in range(spec["threads"] - 1)]  # filled: resident
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    for _ in range(2):
        for truncate in (False, True):
            service = Service(models, limits.model_copy(update={"truncate": truncate}))
            for name, model in models.items():
                runtime = model.runtime
                bodies = hostile_bodies(limits.max_batch, limits.max_body_bytes, runtime.max_input_chars, name)
                for code, count in send_bodies(service, INFERENCE_PATHS[runtime.spec.task], bodies).items():
                    statuses[code] = statuses.get(code, 0) + count
    del waiting
    return {"statuses": statuses, "seconds": round(time.perf_counter() - started, 2)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    before_imports = status_mb()
    # What a gunicorn worker holds: the master's gunicorn modules (inherited at fork) and the app.
    import gunicorn.app.wsgiapp  # noqa: F401

    import serve.app
    import serve.worker  # noqa: F401
    from serve.config import SessionSettings
    from serve.runtime import ModelRuntime

    after_imports = status_mb()
    pinned = pin_allocator()  # as the service's app factory does
    limits = spec["limits"]
    seq_len, max_batch = limits["max_seq_len"], limits["max_batch"]
    runtimes, loaded = [], []
    for model in spec["models"]:  # each with its own micro-batch: `batch` full-length rows per run
        runtimes.append(
            ModelRuntime(
                Path(model["folder"]),
                SessionSettings.model_validate(model["session_options"]),
                max_seq_len=seq_len,
                max_tokens_per_run=model["batch"] * seq_len,
                max_batch=max_batch,
                max_input_chars=limits.get("max_input_chars"),
                max_request_chars=limits.get("max_request_chars"),
            )
        )
        loaded.append(round(status_mb(), 1))
    after_load = status_mb()
    for request in shape_history(max_batch, seq_len):
        for runtime in runtimes:
            runtime.embed(request)
    inputs = [worst_case_texts(model["batch"], seq_len) for model in spec["models"]]
    peaks: list[float] = []
    for _ in range(spec["repeats"]):
        for runtime, texts in zip(runtimes, inputs, strict=True):
            runtime.embed(texts)
        peaks.append(status_mb("VmHWM"))
    for request in sweep_requests(max_batch, seq_len):
        for runtime in runtimes:
            runtime.embed(request)
    before_request_path = status_mb("VmHWM")
    bodies = request_path(runtimes, spec) if spec.get("request_path") else None
    leaked = [name for name in FORBIDDEN_MODULES if name in sys.modules]
    return {
        "rss_start_mb": round(before_imports, 1),
        "rss_after_imports_mb": round(after_imports, 1),
        "rss_after_load_mb": round(after_load, 1),
        "rss_after_each_load_mb": loaded,
        "vmhwm_mb": round(status_mb("VmHWM"), 1),
        "vmhwm_before_request_path_mb": round(before_request_path, 1),
        "request_path": bodies,
        "allocator_pinned": pinned,
        "weights": [runtime.weights.to_json() for runtime in runtimes],
        "max_input_chars": [runtime.max_input_chars for runtime in runtimes],
        "max_request_chars": [runtime.max_request_chars for runtime in runtimes],
        "vmhwm_per_repeat_mb": [round(p, 1) for p in peaks],
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "forbidden_modules_loaded": leaked,
    }


def main() -> None:
    """Re-spawn once from this small interpreter: Linux carries ru_maxrss across fork+exec, so a probe
    forked straight from the (large) pipeline process would report the pipeline's peak as its own."""
    if sys.argv[1:2] == [CHILD_FLAG]:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    done = subprocess.run([sys.executable, "-m", "serve.probe", CHILD_FLAG, sys.argv[1]], check=False)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
