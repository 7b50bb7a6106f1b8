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

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from serve.runtime import ModelRuntime

ROUNDS = 7
TEXTS_PER_ROUND = 20


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
        """At least `min_speedup` times as fast, by a gap the rounds' own variation cannot explain."""
        gap = other.median_ms - self.median_ms
        return other.median_ms >= self.median_ms * min_speedup and gap > max(self.spread_ms, other.spread_ms)

    def describe(self) -> str:
        return f"{self.median_ms:.2f} ms ({self.low_ms:.2f}–{self.high_ms:.2f})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def time_interleaved(runtimes: dict[str, ModelRuntime], texts: list[str], rounds: int = ROUNDS) -> dict[str, Timing]:
    """Each round times every candidate on the same texts, one at a time, in an order rotated per round."""
    names = list(runtimes)
    for runtime in runtimes.values():
        runtime.embed(texts[:1])  # warm-up
    fastest: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples = []
            for text in texts[:TEXTS_PER_ROUND]:
                started = time.perf_counter()
                runtimes[name].embed([text])
                samples.append((time.perf_counter() - started) * 1000)
            fastest[name].append(min(samples))
    return {name: Timing.of(values) for name, values in fastest.items()}
