"""Progress output for long stages: a bar for loops (off a terminal, a line every 30 s), a timed line per step."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


LOG_INTERVAL_S = 30.0  # off a terminal, at most one progress line this often


def bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A bar on a terminal. Elsewhere (a CI log, `make optimize > log`) a bar is unreadable, and none
    would leave mpnet's evaluation (32 min on a shared machine) silent: a line at most every LOG_INTERVAL_S instead."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=description, total=total, file=sys.stderr, leave=False, mininterval=1.0)
        return
    count = total if total is not None else len(items) if isinstance(items, Sized) else None
    started = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= LOG_INTERVAL_S:
            last = now
            of = f" of {count} ({done / count:.0%})" if count else ""
            print(f"memfit: {description}: {done}{of}, {now - started:.0f} s", file=sys.stderr, flush=True)


@dataclass
class Elapsed:
    seconds: float = 0.0


@contextlib.contextmanager
def step(description: str) -> Iterator[Elapsed]:
    """A timed line before and after the block; the seconds it took are also kept, for the report."""
    print(f"memfit: {description} ...", file=sys.stderr, flush=True)
    elapsed = Elapsed()
    started = time.perf_counter()
    yield elapsed
    elapsed.seconds = time.perf_counter() - started
    print(f"memfit: {description}: done in {elapsed.seconds:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_logs(*names: str) -> Iterator[None]:
    """Raise the named loggers ("" is the root) to ERROR for the block: the quantizers log an advisory
    or a line per node on every call, which buries the build output."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
