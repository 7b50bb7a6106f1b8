"""What shared (prepacked, memory-mapped) weights change, per kind of candidate: private (anonymous) and
file-backed memory after load and after the worst-case run, the peak, and one-text latency, each loaded
both ways in a fresh process.

Usage: python -m benchmarks.shared_weights BUILD_DIR [--extra wo8-matmul-gather-b32] [--out FILE.json]
BUILD_DIR is a model's build folder (build/minilm); `--extra` builds more candidate kinds from its fp32
export into a temp folder first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.record import write_record
from pipeline.candidates import CANDIDATES, PassJob
from pipeline.memory.probe import PROJECT_ROOT, probe_env
from pipeline.prepack import ensure_prepacked
from serve.config import SessionSettings
from serve.runtime import MODEL_FILE, RUNTIME_FILE, TOKENIZER_FILE, session_options

FIELDS = ("VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, float]:
    figures = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            figures[key] = round(int(value.split()[0]) / 1024, 1)
    return figures


def measure(folder: str, policy: str, rows: int, seq_len: int) -> dict[str, Any]:
    """In this (fresh) process: load `folder` with SHARED_WEIGHTS=`policy`, run the worst case, time one text."""
    from serve.probe import worst_case_texts
    from serve.runtime import ModelRuntime

    runtime = ModelRuntime(Path(folder), SessionSettings(), seq_len, rows * seq_len, shared_weights=policy)  # type: ignore[arg-type]
    loaded = status()
    runtime.embed(worst_case_texts(rows, seq_len))
    ran = status()
    timings = []
    for _ in range(30):
        started = time.perf_counter()
        runtime.embed(["a quiet, funny film about memory"])
        timings.append((time.perf_counter() - started) * 1000)
    return {
        "weights": runtime.weights.to_json(),
        "after_load": loaded,
        "after_run": ran,
        "p50_ms": round(statistics.median(timings), 2),
    }


def fresh(folder: Path, policy: str, rows: int, seq_len: int) -> dict[str, Any]:
    code = (
        "import json, sys; from benchmarks.shared_weights import measure; "
        f"print(json.dumps(measure(sys.argv[1], {policy!r}, {rows}, {seq_len})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        cwd=PROJECT_ROOT,
        env=probe_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_extra(build_dir: Path, name: str, into: Path) -> Path:
    spec = CANDIDATES[name]
    base = next(build_dir.glob(f"*/candidates/{spec.base or 'fp32'}"))
    target = into / name
    target.mkdir()
    for file in (TOKENIZER_FILE, RUNTIME_FILE):
        shutil.copy2(base / file, target / file)
    assert spec.build is not None
    spec.build(PassJob(base / MODEL_FILE, target / MODEL_FILE, "bert", None))
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = sorted(args.build_dir.glob("*/candidates/*"))
        folders += [build_extra(args.build_dir, name, Path(tmp)) for name in args.extra]
        rows = []
        for folder in folders:
            ensure_prepacked(folder / MODEL_FILE, session_options(SessionSettings()))
            private = fresh(folder, "private", args.rows, args.seq_len)
            shared = fresh(folder, "require", args.rows, args.seq_len)
            rows.append({"candidate": folder.name, "private": private, "shared": shared})
            print(
                f"{folder.name}: RssAnon after load {private['after_load']['RssAnon']} -> "
                f"{shared['after_load']['RssAnon']} MB, after run {private['after_run']['RssAnon']} -> "
                f"{shared['after_run']['RssAnon']} MB, RssFile after run {private['after_run']['RssFile']} -> "
                f"{shared['after_run']['RssFile']} MB, VmHWM {private['after_run']['VmHWM']} -> "
                f"{shared['after_run']['VmHWM']} MB, p50 {private['p50_ms']} -> {shared['p50_ms']} ms",
                flush=True,
            )
    write_record(args.out, rows, input=f"{args.rows} x {args.seq_len} tokens, then 30 one-text runs")


if __name__ == "__main__":
    main()
