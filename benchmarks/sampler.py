"""Memory sampler in its own process, so request threads and the load generator cannot starve it:
`python -m benchmarks.sampler MASTER_PID` samples master + workers every 10 ms until its stdin closes,
then prints one JSON line: peak figures, number of samples and the longest gap between two."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from pipeline.servebench import MemorySampler


def main() -> None:
    # Ahead of the worker, the clients and the orchestrator on a busy machine, where allowed (root).
    with contextlib.suppress(PermissionError):
        os.nice(-10)
    with MemorySampler(int(sys.argv[1]), interval=0.01) as sampler:
        sys.stdin.read()  # returns when the parent closes the pipe
    print(json.dumps({"peak": sampler.peak(), "samples": len(sampler.samples), "max_gap_ms": sampler.max_gap_ms()}))


if __name__ == "__main__":
    main()
