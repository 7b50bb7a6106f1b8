"""A benchmark's JSON record: when and where it ran, what it was given, and its rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.provenance import machine, versions


def write_record(out: Path | None, rows: list[dict[str, Any]], **given: Any) -> None:
    """Write the record to `out` (nothing when None): the date, `given`, the machine, versions and rows."""
    if out is None:
        return
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), **given}
    record |= {"machine": machine(), "versions": versions(), "rows": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
