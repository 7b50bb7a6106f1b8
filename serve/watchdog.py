"""The memory watchdog: after each request a worker compares its RSS with its proven peak.

A worker over `proven peak × (1 + WATCHDOG_MARGIN_PCT / 100)` has answered its request; it then exits
gracefully and gunicorn starts a fresh one, so memory that the proof does not cover is never kept
silently. Each recycle is logged and appended to a file the master creates for the service's run, so
`/api/health` shows the count across worker generations.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.config import ConfigError
from serve.memory import status_mb

log = logging.getLogger("memfit.serve")
RUN_DIR_ENV = "MEMFIT_RUN_DIR"
RECYCLES_FILE = "recycles.jsonl"


@dataclass
class Watchdog:
    proven_peak_mb: float
    margin_pct: float
    _claim: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _recycling: bool = field(default=False, repr=False, compare=False)

    @property
    def limit_mb(self) -> float:
        return self.proven_peak_mb * (1 + self.margin_pct / 100)

    def over_limit(self) -> float | None:
        """This process's RSS in MB when it is over the limit (the recycle is then recorded), else None.
        Only the first request to find it over says so: requests finishing on other threads meanwhile see
        the same RSS, and one worker is recycled once."""
        with self._claim:
            if self._recycling:
                return None
            rss = status_mb()
            if rss <= self.limit_mb:
                return None
            self._recycling = True
        log.warning(
            "worker %d: RSS %.1f MB is over its proven peak %.1f MB + %g%% (%.1f MB); recycling after this request",
            os.getpid(),
            rss,
            self.proven_peak_mb,
            self.margin_pct,
            self.limit_mb,
        )
        record = {"pid": os.getpid(), "rss_mb": round(rss, 1), "limit_mb": round(self.limit_mb, 1), "at": time.time()}
        path = recycles_path()
        if path is not None:
            with path.open("a", encoding="utf-8") as handle:  # one short line per append: atomic
                handle.write(json.dumps(record) + "\n")
        return rss

    def status(self) -> dict[str, Any]:
        path = recycles_path()
        lines = path.read_text(encoding="utf-8").splitlines() if path is not None and path.exists() else []
        return {
            "proven_peak_mb": round(self.proven_peak_mb, 1),
            "limit_mb": round(self.limit_mb, 1),
            "recycles": len(lines),
            "last_recycle": json.loads(lines[-1]) if lines else None,
        }


def recycles_path() -> Path | None:
    folder = os.environ.get(RUN_DIR_ENV)
    return Path(folder) / RECYCLES_FILE if folder else None


def margin_pct() -> float:
    """WATCHDOG_MARGIN_PCT (5); a value that is not a number of 0 or more is a one-line config error."""
    raw = os.environ.get("WATCHDOG_MARGIN_PCT", "5")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"WATCHDOG_MARGIN_PCT must be a number of 0 or more (got {raw!r})")
    return value
