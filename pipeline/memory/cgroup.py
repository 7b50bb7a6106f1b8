"""Memory as the kernel counts it: a child memory cgroup (v1) of this process's own, limited to a budget,
holding only the processes memfit starts, the way a container host enforces its limit.

Its peak (`memory.max_usage_in_bytes`) counts every page once, shared or not, page cache included;
`failcnt` counts the times the limit pressed the kernel to reclaim, and `oom_kill` the processes it
killed. The child is always emptied (its processes moved back to the parent) and removed on exit.

A file page is charged to the cgroup of the process that first brought it into the page cache, by reading
or by writing it, and stays charged there while it is cached. A container that has just started reads
every file itself; to count as it does, `evict` drops files from the cache first.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
MB = 1024 * 1024


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


def evict(files: Iterable[Path]) -> int:
    """Write back and drop from the page cache each of `files` (but pages some process maps), so that the
    next process to read one is charged for it; how many could be opened. Written back first: the kernel
    does not drop a page that is still dirty, as a file the build has just written is."""
    count = 0
    for file in files:
        try:
            with file.open("rb") as handle:
                os.fdatasync(handle.fileno())
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            continue
        count += 1
    return count


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
