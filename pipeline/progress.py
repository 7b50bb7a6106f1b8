"""Progress output for long stages: a bar for loops (on a terminal), a timed line for single steps."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    yield from tqdm(items, desc=description, total=total, file=sys.stderr, leave=False, mininterval=1.0, disable=None)


@contextlib.contextmanager
def step(description: str) -> Iterator[None]:
    print(f"memfit: {description} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    print(f"memfit: {description}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
