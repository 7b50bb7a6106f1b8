"""The micro-batch by speed: the fewest full-length rows per session run that the whole batch is not
measurably faster than. Activation memory grows with the rows of a run, speed need not: MiniLM int8 on 2
cores ran a 32 × 128 request in 514 ms one row per run and 548 ms all 32 rows in one, while the worker
peaked at 169 MB against 279 (benchmarks/results/micro-batch-minilm-2026-12-06.md). Memory a run holds
without making it faster is memory every worker pays for nothing.

One candidate is timed on one intra-op thread in a fresh process whose allocator is set as a worker's, on
the worst-case input: its whole batch in one run beside 1, 2, 4, … rows per run, interleaved round by round
(pipeline/ranking.py), the ladder stopping at the first count the whole batch (as timed beside the first
step) is not faster than by MICRO_BATCH_SLOWDOWN and by more than the rounds' spread. Memory can then only
lower the count (pipeline/stages/measure.py).

Usage: python -m pipeline.micro_batch SPEC_JSON (prints one JSON line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.memory.probe import run_fresh
from pipeline.ranking import WORST_CASE_ROUNDS, Timing, time_interleaved
from serve.config import Limits, SessionSettings
from serve.memory import pin_allocator
from serve.probe import worst_case_texts
from serve.runtime import ModelRuntime

# Fewer rows per run are kept unless the whole batch is this many times as fast (and by more than the
# spread of the rounds): a rule noise cannot flip where the speed is flat, which it is on CPU.
MICRO_BATCH_SLOWDOWN = 1.1
MICRO_BATCH_VERSION = 2  # bump when the timing changes: cached timings keyed on it are then redone
# One candidate's ladder: 3 rounds of two worst-case requests a side per step (MiniLM int8: 16.9 s for the
# one step it took, on one thread beside a CI run); the limit allows for a large model and every step.
MICRO_BATCH_TIMEOUT_S = 1800


def row_ladder(max_batch: int) -> list[int]:
    """Rows per run to try, fewest first: 1, 2, 4, … below `max_batch`."""
    return [1 << power for power in range(max_batch.bit_length()) if 1 << power < max_batch]


def fewest_rows_at_full_speed(timings: dict[int, Timing], max_batch: int) -> int:
    """The fewest timed rows per run that the whole batch (`max_batch` rows) is not measurably faster
    than; `max_batch` when it is faster than every count timed."""
    full = timings[max_batch]
    fast_enough = [rows for rows in sorted(timings) if not full.faster_than(timings[rows], MICRO_BATCH_SLOWDOWN)]
    return min(fast_enough, default=max_batch)


class AtRows:
    """One runtime run at `rows` full-length rows per session run (the runtime is shared by the steps)."""

    def __init__(self, runtime: ModelRuntime, rows: int):
        self.runtime, self.rows = runtime, rows

    def embed(self, texts: list[str]) -> object:
        self.runtime.max_tokens_per_run = self.rows * self.runtime.max_seq_len
        return self.runtime.embed(texts)


def time_micro_batches(folder: Path, settings: SessionSettings, limits: Limits) -> dict[int, Timing]:
    """Worst-case request timings by rows per run: the whole batch and each step of the ladder timed
    until the rule above stops it."""
    spec = {"folder": str(folder), "session": settings.model_dump(), "limits": limits.model_dump()}
    found = run_fresh("pipeline.micro_batch", spec, MICRO_BATCH_TIMEOUT_S, "micro-batch timing")
    return row_timings_from_json(found)


def time_micro_batches_here(spec: dict[str, Any]) -> dict[int, Timing]:
    """time_micro_batches' measurement, in this process (a fresh one)."""
    limits = Limits.model_validate(spec["limits"])
    batch, seq_len = limits.max_batch, limits.max_seq_len
    # One intra-op thread: with two, each run waits for both threads, and on a busy machine a descheduled
    # thread made small runs dear (one row 1.36× the whole batch in a CI build beside an mpnet build, 1.01×
    # idle), so the choice followed the machine's load. Workers beyond one run one thread each anyway.
    settings = SessionSettings.model_validate(spec["session"]).model_copy(update={"intra_op_num_threads": 1})
    runtime = ModelRuntime(Path(spec["folder"]), settings, seq_len, batch * seq_len, batch)
    worst = [worst_case_texts(batch, seq_len)] * 2
    timings: dict[int, Timing] = {}
    for rows in row_ladder(batch):
        pair = time_interleaved({batch: AtRows(runtime, batch), rows: AtRows(runtime, rows)}, worst, WORST_CASE_ROUNDS)
        timings.setdefault(batch, pair[batch])  # every step is judged against the first: the record shows why
        timings[rows] = pair[rows]
        if fewest_rows_at_full_speed(timings, batch) < batch:
            break
    return timings or time_interleaved({batch: AtRows(runtime, batch)}, worst, WORST_CASE_ROUNDS)


def row_timings_json(timings: dict[int, Timing]) -> dict[str, dict[str, Any]]:
    return {str(rows): timing.to_json() for rows, timing in sorted(timings.items())}


def row_timings_from_json(found: dict[str, dict[str, Any]]) -> dict[int, Timing]:
    return {int(rows): Timing(**timing) for rows, timing in found.items()}


def main() -> None:
    pin_allocator()
    print(json.dumps(row_timings_json(time_micro_batches_here(json.loads(sys.argv[1])))))


if __name__ == "__main__":
    main()
