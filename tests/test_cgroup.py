"""The kernel's count: a child memory cgroup holds only the processes memfit starts, reports their peak
and OOM kills, and is always removed. Skipped (with the reason) where no cgroup can be created."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.memory.cgroup import MemoryCgroup, evict, service_files, unavailable_reason
from pipeline.memory.harness import mapped_pages
from serve.artifacts import drop_cached

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"memory cgroup: {REASON}")
ALLOCATE = "import sys, time; block = bytearray(int(sys.argv[1]) << 20); block[::4096] = b'x' * len(block[::4096])"


def run_in(group: MemoryCgroup, mb: int) -> int:
    done = subprocess.run([sys.executable, "-c", ALLOCATE, str(mb)], preexec_fn=group.join, timeout=60, check=False)
    return done.returncode


def test_a_process_within_the_limit_is_counted_once() -> None:
    with MemoryCgroup(128) as group:
        assert run_in(group, 40) == 0
        figures = group.figures()
    assert 40 <= figures.peak_mb <= 128 and figures.oom_kills == 0
    assert not group.path.exists()


def test_a_process_over_the_limit_is_oom_killed_and_reported() -> None:
    with MemoryCgroup(64) as group:
        assert run_in(group, 200) == -9
        figures = group.figures()
    assert figures.oom_kills == 1 and figures.failcnt > 0
    assert not group.path.exists()


def test_what_the_cgroup_holds_splits_page_cache_from_anonymous_memory(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    with data.open("wb") as handle:
        handle.write(os.urandom(24 << 20))
        handle.flush()
        os.fsync(handle.fileno())  # written back, so the cache can be dropped and read in again
    drop_cached(data)
    reader = f"open({str(data)!r}, 'rb').read(); {ALLOCATE}; print(flush=True); sys.stdin.read()"
    with MemoryCgroup(256) as group:
        child = subprocess.Popen(
            [sys.executable, "-c", reader, "40"], preexec_fn=group.join, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert child.stdout is not None and child.stdout.readline()
            held = group.held_mb()
        finally:
            child.communicate(timeout=60)
    if held["cache"] < 24:
        pytest.skip(f"{tmp_path}: this filesystem's pages are not page cache the kernel can drop (tmpfs)")
    assert held["rss"] >= 40 and held["mapped_file"] < 24
    assert held["usage"] >= held["rss"] + held["cache"] - 1


def test_the_peak_restarts_from_what_the_cgroup_holds() -> None:
    script = f"{ALLOCATE}; print(flush=True); sys.stdin.readline(); del block; print(flush=True); sys.stdin.read()"
    with MemoryCgroup(256) as group:
        child = subprocess.Popen(
            [sys.executable, "-c", script, "64"], preexec_fn=group.join, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdout.readline()
            child.stdin.write(b"freed\n")
            child.stdin.flush()
            child.stdout.readline()
            before = group.restart_peak()
            after = group.figures().peak_mb
            held = group.held_mb()["usage"]
        finally:
            child.communicate(timeout=60)
    assert before >= 64 > after and abs(after - held) < 2


def filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on."""
    mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return max((m for m in mounts if path.resolve().is_relative_to(m[0])), key=lambda m: len(m[0]))[1]


def test_a_file_just_written_is_charged_to_its_next_reader_once_evicted(tmp_path: Path) -> None:
    if filesystem(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {filesystem(tmp_path)}: its pages are memory, never evicted")
    data = tmp_path / "written.bin"
    data.write_bytes(os.urandom(24 << 20))  # in the page cache, dirty, charged to this process's cgroup
    eviction = evict([data, tmp_path / "missing.bin"])
    assert eviction.files == 1 and eviction.still_cached == {}
    with MemoryCgroup(256) as group:
        reader = [sys.executable, "-c", f"open({str(data)!r}, 'rb').read()"]
        subprocess.run(reader, preexec_fn=group.join, timeout=60, check=True)
        held = group.held_mb()
    assert held["cache"] >= 24


def test_checking_a_file_leaves_none_of_it_charged(tmp_path: Path) -> None:
    """sha256_file(drop_behind=True) in a fresh cgroup: the peak stays below the file's size."""
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(48 << 20))
    evict([data])
    check = f"from serve.artifacts import sha256_file; sha256_file(__import__('pathlib').Path({str(data)!r}), True)"
    with MemoryCgroup(256) as group:
        subprocess.run([sys.executable, "-c", check], preexec_fn=group.join, timeout=60, check=True)
        figures, held = group.figures(), group.held_mb()
    assert held["cache"] < 4 and figures.peak_mb < 48


def test_what_a_process_maps_stays_cached_and_counts_where_the_service_maps_it(tmp_path: Path) -> None:
    """A page some process maps cannot be dropped: the eviction reports it, and counts it as uncharged
    for the processes that map it too, page by page (here: this process maps the first 8 MB of a 16 MB
    file; a sleeping child maps none of it)."""
    if filesystem(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {filesystem(tmp_path)}: its pages are memory, never evicted")
    mapped, unmapped = tmp_path / "mapped.bin", tmp_path / "unmapped.bin"
    for file in (mapped, unmapped):
        file.write_bytes(os.urandom(16 << 20))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with mapped.open("rb") as handle, mmap.mmap(handle.fileno(), 8 << 20, prot=mmap.PROT_READ) as view:
            assert len({view[offset] for offset in range(0, len(view), mmap.PAGESIZE)}) > 0  # every page read
            eviction = evict([mapped, unmapped])
            assert eviction.uncharged_mb(mapped_pages([os.getpid()], eviction.still_cached)) == 8.0
            assert eviction.uncharged_mb(mapped_pages([child.pid, 999_999_999], eviction.still_cached)) == 0.0
    finally:
        child.kill()
        child.wait(timeout=60)
    assert eviction.files == 2 and list(eviction.still_cached) == [str(mapped.resolve())]
    assert eviction.still_cached_mb() >= 8.0


def test_the_service_files_are_the_import_path_the_project_the_artifacts_and_what_this_process_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each once: a root inside another (the venv inside the project) is not walked twice, and a
    site-packages folder off the import path (the interpreter's own, beside a venv) is left out."""
    stdlib, project = tmp_path / "lib", tmp_path / "project"
    venv, artifacts = project / ".venv" / "site-packages", project / "artifacts"
    for file in (
        stdlib / "os.py",
        stdlib / "site-packages" / "stray" / "off_path.py",
        project / "serve" / "app.py",
        venv / "pkg" / "module.py",
        artifacts / "model.onnx",
    ):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"x")
    monkeypatch.setattr(sys, "path", ["", str(stdlib), str(venv)])
    files = list(service_files(project, artifacts))
    assert len(files) == len(set(files))
    assert {"os.py", "app.py", "module.py", "model.onnx"} <= {file.name for file in files}
    assert "off_path.py" not in {file.name for file in files}
    assert Path(os.path.realpath(sys.executable)) in files  # mapped by this process, outside every root


READ_SLOWLY = """
import sys, time
from pathlib import Path
from serve.artifacts import dropped_meanwhile
data = Path(sys.argv[1])
def read() -> None:
    with data.open("rb") as handle:
        while handle.read(1 << 20):
            time.sleep(0.005)
if sys.argv[2] == "dropped":
    with dropped_meanwhile([data]):
        read()
else:
    read()
"""


def test_a_file_read_while_dropped_meanwhile_is_never_charged_whole(tmp_path: Path) -> None:
    """What a session's load reads and does not map is dropped while it loads: a 48 MB file read 1 MB at a
    time peaks far below its size in a fresh cgroup, where read alone it is charged in full."""
    if filesystem(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {filesystem(tmp_path)}: its pages are memory, never evicted")
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(48 << 20))
    peaks = {}
    for mode in ("read", "dropped"):
        evict([data])
        with MemoryCgroup(256) as group:
            reader = [sys.executable, "-c", READ_SLOWLY, str(data), mode]
            subprocess.run(reader, preexec_fn=group.join, timeout=120, check=True)
            peaks[mode] = group.figures().peak_mb
    assert peaks["read"] > 48 and peaks["dropped"] < 24, peaks
