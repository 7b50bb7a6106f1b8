"""The allocator setting the service and the probe share: with glibc's mmap threshold fixed, freed large
buffers go back to the OS even after a larger one was freed (the dynamic threshold keeps them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

AFTER_A_LARGE_FREE = """
import json, sys
from serve.memory import pin_allocator, status_mb
pinned = pin_allocator() if sys.argv[1] == "pin" else False
large = bytearray(16 * 2**20); del large  # freed: a dynamic threshold now rises to 16 MB
before = status_mb()
blocks = [bytearray(2**20) for _ in range(60)]
del blocks[:-1]  # all but the last: heap chunks under it cannot be trimmed, mapped ones are unmapped
print(json.dumps({"pinned": pinned, "kept_mb": status_mb() - before}))
"""


def kept_after_free(mode: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", AFTER_A_LARGE_FREE, mode], capture_output=True, text=True, cwd=REPO, check=True
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pinned_threshold_returns_freed_buffers_and_the_dynamic_one_does_not() -> None:
    dynamic, pinned = kept_after_free("dynamic"), kept_after_free("pin")
    assert pinned["pinned"] is True
    assert pinned["kept_mb"] < 5  # the one block still held
    assert dynamic["kept_mb"] > 30  # what a worker kept before the fix
