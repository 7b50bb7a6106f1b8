"""Memory figures of a process from /proc: RSS, peak RSS (VmHWM) and PSS, in MB (MiB); and the two
settings that keep a worker's peak where the build measured it: the allocator pinned, the model's mapped
files resident from load."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

M_ARENA_MAX = -8  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENAS = 1


_pinned: list[bool] = []  # this process's pin_allocator() result, once called


def allocator_pinned() -> bool | None:
    """Whether this process's pin_allocator() succeeded (None: never called)."""
    return _pinned[-1] if _pinned else None


def pin_allocator(threshold: int = MMAP_THRESHOLD_BYTES, arenas: int = ARENAS) -> bool:
    """Keep glibc's heap where the build measured it. By default each freed large block raises the mmap
    threshold to its size, so later buffers of other shapes come from the heap, which glibc seldom gives
    back: mpnet serving varied request shapes measured 55 MB above the same mix with the threshold fixed,
    where every block of 128 KiB or more is mapped, and unmapped when freed. And each thread that
    allocates gets an arena of its own that keeps what it freed: a worker reads requests in several
    threads, so all share one arena. Both the service and the memory probe call this, so what the build
    measures is what the worker does. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        pinned = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        pinned = False
    _pinned.append(pinned)
    return pinned


def map_in_full(folder: Path) -> float:
    """Read one byte of every page this process maps from `folder`'s files; their MB. ONNX Runtime maps
    the prepacked weights and a page comes in only when a run first reads it, so the embedding table
    came in a token at a time: a worker's memory grew with the vocabulary its requests used (mpnet, 320
    real reviews: 60 MB over a proof whose worst case repeats one word). Read in full at load, a worker
    holds from its start what it would hold after any requests, and the probe, loading the same way,
    measures that. The pages stay clean and file-backed: shared by the workers, reclaimable."""
    prefix = str(folder.resolve()) + os.sep
    mapped = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith(prefix) or not fields[1].startswith("r"):
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        try:  # never past the file's end: such a page faults with SIGBUS
            readable = min(end - start, os.path.getsize(fields[5]) - int(fields[2], 16))
        except OSError:
            continue
        if readable > 0:
            memoryview((ctypes.c_char * readable).from_address(start)).cast("B")[:: mmap.PAGESIZE].tobytes()
            mapped += readable
    return mapped / 2**20


def status_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    """A figure of /proc/<pid>/status (VmRSS, VmHWM, ...) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/{pid}/status")


def rollup_mb(pid: int | str = "self") -> dict[str, float]:
    """Rss, Pss and Pss_Anon of /proc/<pid>/smaps_rollup in MB (PSS splits pages shared with other
    processes; its anonymous part, with the processes forked from the same parent)."""
    figures = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon"):
            figures[key.lower()] = int(rest.split()[0]) / 1024
    return figures
