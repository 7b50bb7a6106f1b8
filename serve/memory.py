"""Memory figures of a process from /proc: RSS, peak RSS (VmHWM) and PSS, in MB (MiB)."""

from __future__ import annotations

from pathlib import Path


def status_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    """A figure of /proc/<pid>/status (VmRSS, VmHWM, ...) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/{pid}/status")


def rollup_mb(pid: int | str = "self") -> dict[str, float]:
    """Rss and Pss of /proc/<pid>/smaps_rollup in MB (PSS splits pages shared with other processes)."""
    figures = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            figures[key.lower()] = int(rest.split()[0]) / 1024
    return figures
