"""The two settings the service and the probe share: with glibc's mmap threshold fixed, freed large
buffers go back to the OS even after a larger one was freed (the dynamic threshold keeps them); and a
model folder's mapped files are resident from load, not page by page as requests read them. And how a
group of processes' own pages are counted: each resident page once."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.memory.harness import own_pages_mb
from serve.memory import map_in_full, rollup_mb
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


def resident_mb(path: Path) -> float:
    """Rss of this process's mappings of `path` (/proc/self/smaps), in MB."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident / 1024


def test_a_model_folders_mapped_files_are_read_in_full_and_no_other(tmp_path: Path) -> None:
    folder, elsewhere = tmp_path / "model", tmp_path / "other"
    folder.mkdir()
    elsewhere.mkdir()
    weights, other = folder / "model.prepacked.bin", elsewhere / "model.prepacked.bin"
    for path in (weights, other):
        path.write_bytes(bytes(range(256)) * (24 * 4096 + 7))  # 24 MB and a part page: never read past its end
    with weights.open("rb") as a, other.open("rb") as b:
        mapped = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in (a, b)]
        mapped.append(mmap.mmap(a.fileno(), 8 * 2**20, access=mmap.ACCESS_READ, offset=8 * 2**20))
        assert resident_mb(weights) < 1 and resident_mb(other) < 1
        read = map_in_full(folder)
        assert read == pytest.approx(weights.stat().st_size / 2**20 + 8)  # the whole file, and the window again
        assert resident_mb(weights) == pytest.approx(read, abs=4 / 1024)
        assert resident_mb(other) < 1
        for view in mapped:
            view.close()


FORKED_WITH_A_BUFFER = """
import os, sys, time
buffer = bytearray(b"x") * (48 * 2**20)  # written, so resident; shared with the child until either writes
child = os.fork()
if child == 0:
    time.sleep(300)
    os._exit(0)
print(child, flush=True)
sys.stdin.read()
os.kill(child, 9)
"""


def test_own_pages_count_each_resident_page_once_and_none_given_away() -> None:
    """A process and its forked child share a 48 MB buffer: their RSS sum counts it twice, their own
    pages once. PSS splits the pages they share with this (outside) process, the interpreter and its
    libraries; own pages count them in full. Own pages are the anonymous part of their PSS (private
    pages only they map) plus their distinct file pages: how the sampler counts them while they run."""
    with subprocess.Popen(
        [sys.executable, "-c", FORKED_WITH_A_BUFFER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None and parent.stdin is not None
        pids = [parent.pid, int(parent.stdout.readline())]
        alone = own_pages_mb(pids[:1])
        if alone is None:
            parent.stdin.close()
            pytest.skip("frame numbers are hidden from this process (needs CAP_SYS_ADMIN)")
        rollups = [rollup_mb(pid) for pid in pids]
        together = own_pages_mb(pids)
        file_pages = own_pages_mb(pids, file_only=True)
        parent.stdin.close()
    assert together is not None and file_pages is not None
    assert abs(alone - rollups[0]["rss"]) < 0.5  # one process: its own pages are its RSS
    assert 48 < together < sum(r["rss"] for r in rollups) - 46  # the buffer once, not twice
    assert together - sum(r["pss"] for r in rollups) > 1.0  # the interpreter's pages this process maps too
    assert abs(sum(r["pss_anon"] for r in rollups) + file_pages - together) < 0.5
