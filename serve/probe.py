"""Peak-memory probe: a fresh process that imports only what a service worker imports, loads model
folders the way the service does and runs the worst-case input the service accepts.

Usage: python -m serve.probe SPEC_JSON  (prints one JSON line). The pipeline calls this for every
candidate; it never measures inside its own process.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from serve.memory import status_mb

FORBIDDEN_MODULES = ("torch", "transformers", "optimum", "sklearn")
WORST_CASE_WORD = "memory"
CHILD_FLAG = "--measure"


def worst_case_texts(batch: int, seq_len: int) -> list[str]:
    """`batch` texts that each tokenize past `seq_len`, so truncation yields full-length rows."""
    return [" ".join([WORST_CASE_WORD] * (seq_len + 8))] * batch


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    before_imports = status_mb()
    # What a gunicorn worker holds: the master's gunicorn modules (inherited at fork) and the app.
    import gunicorn.app.wsgiapp
    import gunicorn.workers.sync  # noqa: F401

    import serve.app  # noqa: F401
    from serve.runtime import ModelRuntime, SessionSettings

    after_imports = status_mb()
    seq_len = spec["seq_len"]
    runtimes, loaded = [], []
    for model in spec["models"]:  # each with its own micro-batch: `batch` full-length rows per run
        runtimes.append(
            ModelRuntime(
                Path(model["folder"]),
                SessionSettings.from_json(model["session_options"]),
                max_seq_len=seq_len,
                max_tokens_per_run=model["batch"] * seq_len,
                max_batch=model["batch"],
            )
        )
        loaded.append(round(status_mb(), 1))
    after_load = status_mb()
    inputs = [worst_case_texts(model["batch"], seq_len) for model in spec["models"]]
    peaks = []
    for _ in range(spec["repeats"]):
        for runtime, texts in zip(runtimes, inputs, strict=True):
            runtime.embed(texts)
        peaks.append(status_mb("VmHWM"))
    leaked = [name for name in FORBIDDEN_MODULES if name in sys.modules]
    return {
        "rss_start_mb": round(before_imports, 1),
        "rss_after_imports_mb": round(after_imports, 1),
        "rss_after_load_mb": round(after_load, 1),
        "rss_after_each_load_mb": loaded,
        "vmhwm_mb": round(status_mb("VmHWM"), 1),
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
