"""Progress output for long stages: a bar for loops (on a terminal), a timed line for single steps."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    yield from tqdm(items, desc=description, total=total, file=sys.stderr, leave=False, mininterval=1.0, disable=None)


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
