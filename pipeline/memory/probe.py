"""Run the peak-memory probe (serve.probe) in a fresh interpreter and read its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import serve
from serve.config import ServiceConfig

PROJECT_ROOT = Path(serve.__file__).resolve().parent.parent


class ProbeError(RuntimeError):
    pass


def probe_env() -> dict[str, str]:
    """The environment of a measuring subprocess: this one's, with the project importable."""
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_fresh(module: str, spec: dict[str, Any], timeout: int, what: str) -> dict[str, Any]:
    """`python -m module SPEC_JSON` in a fresh interpreter: its last line of output, as JSON."""
    done = subprocess.run(
        [sys.executable, "-m", module, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=probe_env(),
        cwd=PROJECT_ROOT,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProbeError(f"{what} exited {done.returncode}: {tail}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_probe(
    models: list[dict[str, Any]], service: ServiceConfig, repeats: int, request_path: bool = False
) -> dict[str, Any]:
    """Peak RSS of a fresh process that imports what a worker imports, loads `models` (each a dict of
    folder, session_options and batch: full-length rows per run) and runs each at its micro-batch, then
    the largest requests of shorter inputs (up to `max_batch` rows per run, as the service allows), and
    with `request_path` the service's hostile bodies (serve/probe.py)."""
    spec = {
        "models": models,
        "limits": service.limits.model_dump(),
        "threads": service.threads,
        "repeats": repeats,
        "request_path": request_path,
    }
    result = run_fresh("serve.probe", spec, timeout=900, what="memory probe")
    if result["forbidden_modules_loaded"]:
        raise ProbeError(f"memory probe imported build-only modules: {result['forbidden_modules_loaded']}")
    return result
