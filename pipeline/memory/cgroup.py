"""Memory as the kernel counts it: a child memory cgroup (v1) of this process's own, limited to a budget,
holding only the processes memfit starts, the way a container host enforces its limit.

Its peak (`memory.max_usage_in_bytes`) counts every page once, shared or not, page cache included;
`failcnt` counts the times the limit pressed the kernel to reclaim, and `oom_kill` the processes it
killed. The child is always emptied (its processes moved back to the parent) and removed on exit.

A file page is charged to the cgroup of the process that first brought it into the page cache, by reading
or by writing it, and stays charged there while it is cached. A container that has just started reads
every file itself; to count as it does, `evict` drops the service's files from the cache first. A page
some other process maps cannot be dropped (the build's own libraries, a test runner's): `evict` says which
pages of each file stay cached, and `Eviction.uncharged_mb` how many of those the service maps
(`harness.mapped_pages`), which a container would have been charged for too.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
MB = 1024 * 1024
PAGE = mmap.PAGESIZE
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
MAP_FAILED = ctypes.c_void_p(-1).value
PACKAGES = ("site-packages", "dist-packages")


def own_memory_cgroup() -> Path | None:
    """This process's cgroup in the v1 memory hierarchy, or None where there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = V1_ROOT / path.lstrip("/")
            return folder if (folder / "memory.limit_in_bytes").exists() else None
    return None


def unavailable_reason() -> str | None:
    """Why no child memory cgroup can be made here (None when one can)."""
    parent = own_memory_cgroup()
    if parent is None:
        return "no cgroup v1 memory controller for this process"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable (run as root, or with the memory controller delegated)"
    return None


def service_files(root: Path, artifacts: Path) -> Iterator[Path]:
    """Every file a service process may read, each once: what is on this interpreter's import path (the
    service runs the same one; a site-packages folder off the path is left out), the project at `root`,
    the artifacts, and every file this process maps (shared libraries outside those folders among them,
    such as libpython and the C++ runtime: a page it maps stays cached, and is counted where the service
    maps it too)."""
    roots = {Path(entry).resolve() for entry in sys.path if entry and Path(entry).is_dir()}
    roots |= {root.resolve(), artifacts.resolve()}
    for top in sorted(roots):
        for folder, subfolders, names in os.walk(top):
            here = Path(folder)
            # A root inside another is walked on its own; a packages folder that is not a root is off the path.
            subfolders[:] = [name for name in subfolders if here / name not in roots and name not in PACKAGES]
            for name in names:
                file = here / name
                if file.is_file() and not file.is_symlink():
                    yield file
    lines = Path("/proc/self/maps").read_text().splitlines()
    for mapped in {Path(fields[5]) for fields in (line.split(maxsplit=5) for line in lines) if len(fields) == 6}:
        if mapped.is_file() and not any(mapped.is_relative_to(top) for top in roots):
            yield mapped


def resident_pages(fd: int, size: int) -> bytes:
    """Which pages of the open file `fd` (`size` bytes) are in the page cache, a byte each (bit 0): the
    file mapped, unread, and asked of the kernel (mincore)."""
    if size == 0:
        return b""
    address = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        resident = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
        if LIBC.mincore(address, size, resident) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bytes(resident)
    finally:
        LIBC.munmap(address, size)


@dataclass(frozen=True)
class Eviction:
    """What `evict` did: how many files it dropped, and which pages of each stayed cached (pages some
    process maps), by real path: a byte per page, bit 0 set where cached."""

    files: int = 0
    still_cached: dict[str, bytes] = field(default_factory=dict)

    def still_cached_mb(self) -> float:
        return round(sum(len(pages) - pages.count(0) for pages in self.still_cached.values()) * PAGE / MB, 1)

    def uncharged_mb(self, mapped: dict[str, set[int]]) -> float:
        """Of the pages that stayed cached, those in `mapped` (a service's, by file: harness.mapped_pages),
        MB: a container that had just started would have read them itself and been charged for them. Page
        by page: another process (the build) maps other parts of the same libraries too."""
        count = 0
        for path, indices in mapped.items():
            cached = self.still_cached[path]
            count += sum(1 for index in indices if index < len(cached) and cached[index] & 1)
        return round(count * PAGE / MB, 1)


def evict(files: Iterable[Path]) -> Eviction:
    """Drop from the page cache each of `files` (but pages some process maps), so that the next process to
    read one is charged for it. Everything is written back first: the kernel does not drop a page that is
    still dirty, as a file the build has just written is (one sync: a file's own fdatasync costs 70 µs
    even when clean, 21 s over a Python environment's 300,000 files)."""
    os.sync()
    count = 0
    still_cached = {}
    for file in files:
        try:
            with file.open("rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                resident = resident_pages(handle.fileno(), os.fstat(handle.fileno()).st_size)
        except OSError:
            continue
        count += 1
        if resident.count(0) < len(resident):
            still_cached[os.path.realpath(file)] = resident
    return Eviction(count, still_cached)


@dataclass(frozen=True)
class CgroupFigures:
    peak_mb: float
    failcnt: int
    oom_kills: int
    limit_mb: float


class MemoryCgroup:
    """`with MemoryCgroup(limit_mb) as group:` then `group.join()` in a child process before exec (as
    `preexec_fn`), so the process and all it forks are counted; `group.figures()` before leaving."""

    def __init__(self, limit_mb: float, name: str = "memfit"):
        parent = own_memory_cgroup()
        reason = unavailable_reason()
        if parent is None or reason is not None:
            raise RuntimeError(f"memory cgroup unavailable: {reason}")
        self.parent = parent
        self.path = parent / f"{name}-{os.getpid()}-{id(self):x}"
        self.limit_mb = limit_mb

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(int(self.limit_mb * MB)))
        except OSError:
            self.path.rmdir()
            raise
        return self

    def join(self) -> None:
        """Move the calling process into the cgroup (its later children follow it)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def figures(self) -> CgroupFigures:
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return CgroupFigures(
            peak_mb=round(int((self.path / "memory.max_usage_in_bytes").read_text()) / MB, 1),
            failcnt=int((self.path / "memory.failcnt").read_text()),
            oom_kills=int(oom.get("oom_kill", 0)),
            limit_mb=self.limit_mb,
        )

    def restart_peak(self) -> float:
        """The peak so far, MB; the peak then counts again from what the cgroup holds now (a service's load,
        which reads its weights' files through the page cache, apart from its serving)."""
        peak = self.figures().peak_mb
        (self.path / "memory.max_usage_in_bytes").write_text("0")
        return peak

    def held_mb(self) -> dict[str, float]:
        """What the cgroup holds now, MB: its usage, anonymous memory, page cache, and the part of that
        cache that is mapped and the part that is inactive (reclaim drops inactive file pages first)."""
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        held = {"usage": int((self.path / "memory.usage_in_bytes").read_text())}
        held |= {key: int(stat[f"total_{key}"]) for key in ("rss", "cache", "mapped_file", "inactive_file")}
        return {key: round(value / MB, 1) for key, value in held.items()}

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # a process may have exited meanwhile
                    (self.parent / "cgroup.procs").write_text(pid)
            try:
                self.path.rmdir()
                return
            except OSError:  # a process still being reaped
                time.sleep(0.1)
        self.path.rmdir()
