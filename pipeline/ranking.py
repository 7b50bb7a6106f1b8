"""Speed that noise cannot flip: the candidates that pass every gate are timed together, interleaved
round by round in one process (a slow moment of the machine slows them all, not one), with the session
options that ship. A round's figure is the fastest of its one-text runs, as timeit advises: other work on
the machine only ever adds time, so the fastest run is the repeatable part. (The median of a round's 20
runs was not: two MiniLM variants' per-round medians were 0.83–2.14× apart within one run, their
fastest runs 0.79–1.38×, and a fresh build's approval flipped on the medians.) One candidate is faster
than another only when its median round is at least `min_speedup` times as fast (pipeline/config.py:
MIN_SPEEDUP) and the gap exceeds the spread (highest minus lowest round) of either; otherwise the two are
tied on speed and the next criterion decides. The spread alone was not enough: two MiniLM variants 1.2–1.4×
apart were tied on a busy machine and apart on a quiet one, and the approval followed the machine's load.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline.memory.probe import run_fresh
from serve.config import Limits, SessionSettings
from serve.memory import pin_allocator
from serve.probe import WORST_CASE_WORD, worst_case_texts
from serve.runtime import ModelRuntime

ROUNDS = 7
TEXTS_PER_ROUND = 20
# Rounds of the worst-case input per session variant: each is one whole max_batch × max_seq_len run
# (0.3-0.7 s for MiniLM, 4-9 s for mpnet), so fewer rounds than one-text timings get.
WORST_CASE_ROUNDS = 3
# A fresh process times every session variant of one candidate: with the default two, 4-5 s for MiniLM
# and 26 s for mpnet on 2 idle cores (more variants, a busy machine: minutes); the limit allows for that.
SESSION_TIMING_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Timing:
    """One-text latency of a candidate: the median and range of its rounds' fastest runs, in ms."""

    median_ms: float
    low_ms: float
    high_ms: float
    rounds: int

    @classmethod
    def of(cls, rounds: list[float]) -> Timing:
        return cls(
            round(statistics.median(rounds), 3),
            round(min(rounds), 3),
            round(max(rounds), 3),
            len(rounds),
        )

    @property
    def spread_ms(self) -> float:
        return self.high_ms - self.low_ms

    def faster_than(self, other: Timing, min_speedup: float) -> bool:
        """At least `min_speedup` times as fast, by a gap the rounds' own variation cannot explain: wider
        than the spread of either, or with this one's slowest round faster than the other's fastest (on a
        machine busy enough to spread one-text rounds over 2.5-17 ms, a 5.6x gap was narrower than the
        spread, while the two ranges did not even meet)."""
        if other.median_ms < self.median_ms * min_speedup:
            return False
        gap = other.median_ms - self.median_ms
        return self.high_ms < other.low_ms or gap > max(self.spread_ms, other.spread_ms)

    def describe(self) -> str:
        return f"{self.median_ms:.2f} ms ({self.low_ms:.2f}–{self.high_ms:.2f})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


SessionTimings = dict[str, dict[str, Timing]]  # session variant -> "worst_case" / "one_text" -> Timing


def timings_json(timed: SessionTimings) -> dict[str, dict[str, dict[str, Any]]]:
    return {variant: {kind: t.to_json() for kind, t in kinds.items()} for variant, kinds in timed.items()}


def timings_from_json(found: dict[str, dict[str, dict[str, Any]]]) -> SessionTimings:
    return {variant: {kind: Timing(**t) for kind, t in kinds.items()} for variant, kinds in found.items()}


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> object: ...


Name = TypeVar("Name")


def time_interleaved(
    runtimes: Mapping[Name, Embedder], requests: list[list[str]], rounds: int = ROUNDS
) -> dict[Name, Timing]:
    """Each round runs the same requests on every runtime, one runtime at a time, in an order rotated
    per round; a round's figure is its fastest request."""
    names = list(runtimes)
    for runtime in runtimes.values():
        runtime.embed(requests[0])  # warm-up
    fastest: dict[Name, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples = []
            for request in requests:
                started = time.perf_counter()
                runtimes[name].embed(request)
                samples.append((time.perf_counter() - started) * 1000)
            fastest[name].append(min(samples))
    return {name: Timing.of(values) for name, values in fastest.items()}


def one_text_requests(texts: list[str]) -> list[list[str]]:
    return [[text] for text in texts[:TEXTS_PER_ROUND]]


def time_sessions(folder: Path, sessions: dict[str, SessionSettings], limits: Limits) -> SessionTimings:
    """One candidate under each session variant, loaded side by side in a fresh process whose allocator
    is set as a service worker's, and timed interleaved: on the worst-case input (where arena off pays
    for allocating every run) and on one short text (where prepacking off pays for repacking the weights
    every run). The allocator matters: with glibc's mmap threshold pinned (serve/memory.py), every large
    buffer arena off frees is unmapped and faulted in again on the next run, where a build process, whose
    threshold floats up, would reuse it and time arena off as no worker runs it."""
    spec = {
        "folder": str(folder),
        "sessions": {name: settings.model_dump() for name, settings in sessions.items()},
        "limits": limits.model_dump(),
    }
    return timings_from_json(run_fresh("pipeline.ranking", spec, SESSION_TIMING_TIMEOUT_S, "session timing"))


def time_sessions_here(spec: dict[str, Any]) -> SessionTimings:
    """time_sessions' measurement, in this process (a fresh one)."""
    limits = Limits.model_validate(spec["limits"])
    sessions = {name: SessionSettings.model_validate(s) for name, s in spec["sessions"].items()}
    tokens = limits.max_batch * limits.max_seq_len
    runtimes = {
        name: ModelRuntime(Path(spec["folder"]), settings, limits.max_seq_len, tokens, limits.max_batch)
        for name, settings in sessions.items()
    }
    worst = time_interleaved(runtimes, [worst_case_texts(limits.max_batch, limits.max_seq_len)], WORST_CASE_ROUNDS)
    one_text = time_interleaved(runtimes, one_text_requests([WORST_CASE_WORD] * TEXTS_PER_ROUND))
    return {name: {"worst_case": worst[name], "one_text": one_text[name]} for name in runtimes}


def main() -> None:
    pin_allocator()
    print(json.dumps(timings_json(time_sessions_here(json.loads(sys.argv[1])))))


if __name__ == "__main__":
    main()
