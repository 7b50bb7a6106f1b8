"""Peak-memory probe: a fresh process that imports only what a service worker imports, loads model
folders the way the service does and runs the worst-case input the service accepts, then requests of
shorter inputs: a worker's allocators grow with the variety of shapes it runs, not only with the largest.

Usage: python -m serve.probe SPEC_JSON  (prints one JSON line). The pipeline calls this for every
candidate; it never measures inside its own process.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serve.memory import pin_mmap_threshold, status_mb

FORBIDDEN_MODULES = ("torch", "transformers", "optimum", "sklearn")
WORST_CASE_WORD = "memory"
CHILD_FLAG = "--measure"


def worst_case_texts(batch: int, seq_len: int) -> list[str]:
    """`batch` texts that each tokenize past `seq_len`, so truncation yields full-length rows."""
    return [" ".join([WORST_CASE_WORD] * (seq_len + 8))] * batch


def sweep_requests(max_batch: int, seq_len: int) -> list[list[str]]:
    """Largest requests of shorter inputs (an eighth, a quarter and half of `seq_len` tokens): the
    service runs them in micro-batches of other shapes than the worst case's."""
    return [[" ".join([WORST_CASE_WORD] * max(1, seq_len // part - 2))] * max_batch for part in (8, 4, 2)]


def median_ms(runtime: Any, texts: list[str], runs: int = 7) -> float:
    """Median milliseconds of `runs` calls: a short request shows per-run costs a large one hides."""
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        runtime.embed(texts)
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings) * 1000, 3)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    before_imports = status_mb()
    # What a gunicorn worker holds: the master's gunicorn modules (inherited at fork) and the app.
    import gunicorn.app.wsgiapp
    import gunicorn.workers.sync  # noqa: F401

    import serve.app  # noqa: F401
    from serve.runtime import ModelRuntime, SessionSettings

    after_imports = status_mb()
    pin_mmap_threshold()  # as the service's app factory does
    seq_len, max_batch = spec["seq_len"], spec["max_batch"]
    runtimes, loaded = [], []
    for model in spec["models"]:  # each with its own micro-batch: `batch` full-length rows per run
        runtimes.append(
            ModelRuntime(
                Path(model["folder"]),
                SessionSettings.from_json(model["session_options"]),
                max_seq_len=seq_len,
                max_tokens_per_run=model["batch"] * seq_len,
                max_batch=max_batch,
            )
        )
        loaded.append(round(status_mb(), 1))
    after_load = status_mb()
    inputs = [worst_case_texts(model["batch"], seq_len) for model in spec["models"]]
    peaks: list[float] = []
    seconds: list[list[float]] = [[] for _ in runtimes]
    for _ in range(spec["repeats"]):
        for runtime, texts, timings in zip(runtimes, inputs, seconds, strict=True):
            started = time.perf_counter()
            runtime.embed(texts)
            timings.append(time.perf_counter() - started)
        peaks.append(status_mb("VmHWM"))
    one_text_ms = [median_ms(runtime, [WORST_CASE_WORD]) for runtime in runtimes]
    for request in sweep_requests(max_batch, seq_len):
        for runtime in runtimes:
            runtime.embed(request)
    leaked = [name for name in FORBIDDEN_MODULES if name in sys.modules]
    return {
        "rss_start_mb": round(before_imports, 1),
        "rss_after_imports_mb": round(after_imports, 1),
        "rss_after_load_mb": round(after_load, 1),
        "rss_after_each_load_mb": loaded,
        "vmhwm_mb": round(status_mb("VmHWM"), 1),
        "vmhwm_per_repeat_mb": [round(p, 1) for p in peaks],
        "run_s": [round(statistics.median(t), 4) for t in seconds],
        "one_text_ms": one_text_ms,
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
