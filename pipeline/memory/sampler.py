"""Memory sampler in its own process, so request threads and the load generator cannot starve it:
`python -m pipeline.memory.sampler MASTER_PID` samples master + workers every 50 ms until its stdin closes,
then prints one JSON line: peak figures (RSS and PSS sums), number of samples and the longest gap."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

from pipeline.memory.harness import MemorySampler
from pipeline.memory.probe import PROJECT_ROOT, probe_env


class SamplerProcess:
    """`with SamplerProcess(master_pid) as sampler:` samples while the block runs; `sampler.result` after."""

    def __init__(self, master_pid: int):
        self.master_pid = master_pid
        self.result: dict[str, Any] = {}
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> SamplerProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.memory.sampler", str(self.master_pid)],
            cwd=PROJECT_ROOT,
            env=probe_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        output = self.process.communicate("", timeout=60)[0]
        self.result = json.loads(output.strip().splitlines()[-1])


def main() -> None:
    # Ahead of the worker, the clients and the orchestrator on a busy machine, where allowed (root).
    with contextlib.suppress(PermissionError):
        os.nice(-10)
    with MemorySampler(int(sys.argv[1])) as sampler:
        sys.stdin.read()  # returns when the parent closes the pipe
    print(json.dumps({"peak": sampler.peak(), "samples": len(sampler.samples), "max_gap_ms": sampler.max_gap_ms()}))


if __name__ == "__main__":
    main()
