"""Throughput by worker count: the service as shipped (serve/gunicorn.conf.py) with W = 1..N workers, 8
clients each sending one-text requests on a kept-alive connection for a fixed time; requests/s and p50,
and the idle PSS sum before them, beside the planner's predicted peak and the service fit's measured
figures for that W.

Usage: python -m benchmarks.workers [--service configs/service.yaml] [--workers 1 4] [--seconds 20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.record import write_record
from pipeline.memory.harness import GunicornService
from serve.config import load_service_config, resolve
from serve.memory import rollup_mb
from serve.planner import SERVICE_FIT_FILE, idle_master_mb, worker_figures

CLIENTS = 8
TEXT = "A quiet, funny film about memory, love and the city at night."
IDLE_SETTLE_S = 3.0  # every worker has loaded its sessions by then (about 1 s here)


BODY = json.dumps({"inputs": [TEXT]}).encode()
REQUEST = (
    b"POST /api/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
    + BODY
)


def client(port: int, until: float, latencies: list[float]) -> None:
    """A kept-alive connection sending the same request, answers read by their Content-Length: a raw
    socket, since the clients share the service's cores (0.09-0.15 ms of client CPU per request, against
    0.25-0.35 with http.client: benchmarks/results/workers-minilm-2026-12-07-clients.md). A worker that
    recycles answers `Connection: close`: then a new connection."""
    sock: socket.socket | None = None
    pending = b""
    try:
        while time.monotonic() < until:
            if sock is None:
                sock, pending = socket.create_connection(("127.0.0.1", port), timeout=60), b""
            started = time.perf_counter()
            sock.sendall(REQUEST)
            pending, kept_alive = read_answer(sock, pending)
            latencies.append((time.perf_counter() - started) * 1000)
            if not kept_alive:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()


def read_answer(sock: socket.socket, pending: bytes) -> tuple[bytes, bool]:
    """Read one 200 answer whole: what arrived after it, and whether the connection stays open."""
    while b"\r\n\r\n" not in pending:
        pending += receive(sock)
    head, _, rest = pending.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    if status.split(" ", 2)[1] != "200":
        raise RuntimeError(status)
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += receive(sock)
    return rest[length:], headers.get("connection", "").lower() != "close"


def receive(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise RuntimeError("the service closed the connection before answering")
    return chunk


def throughput(service_path: Path, workers: int, seconds: float) -> dict[str, Any]:
    """Requests/s and p50 under the clients, after the idle PSS sum of master and workers (what each
    further worker adds before any request)."""
    with GunicornService(service_path, env={"WORKERS": str(workers)}) as service:
        service.wait_for_workers(workers)
        time.sleep(IDLE_SETTLE_S)
        idle = sum(rollup_mb(pid)["pss"] for pid in [service.master_pid, *service.worker_pids()])
        latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(service.port, until, out)) for out in latencies]
        started, cpu = time.monotonic(), time.process_time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    every = [ms for values in latencies for ms in values]
    return {
        "idle_pss_sum_mb": round(idle, 1),
        "requests_per_s": round(len(every) / elapsed, 1),
        "p50_ms": round(statistics.median(every), 1),
        "client_cpu_ms_per_request": round(cpu * 1000 / len(every), 3),  # the clients' share of the cores
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--service", type=Path, default=Path("configs/service.yaml"))
    parser.add_argument("--workers", type=int, nargs="*", help="the counts to run (default: every one the plan offers)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config, path = load_service_config(args.service)
    figures, _ = worker_figures(config, path)
    if figures.fit is None:
        raise SystemExit(f"memfit bench: no {SERVICE_FIT_FILE} of the current approvals; run `make optimize`")
    master = idle_master_mb()
    measured = {run["workers"]: run for run in figures.fit["runs"]}
    rows = []
    for workers in args.workers or range(1, figures.most_workers(config.budget_mb, master) + 1):
        run = measured.get(workers, {})
        row = {
            "workers": workers,
            "predicted_mb": round(figures.needed_mb(workers, master)[0], 1),
            "cgroup_peak_mb": (run.get("cgroup") or {}).get("peak_mb"),
            "pss_peak_mb": run.get("pss_peak_mb"),
            "rss_sum_peak_mb": run.get("rss_sum_peak_mb"),
            **throughput(args.service, workers, args.seconds),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_record(
        args.out,
        rows,
        service=str(args.service),
        artifacts=str(resolve(path, config.artifacts_dir)),
        clients=CLIENTS,
        seconds=args.seconds,
    )


if __name__ == "__main__":
    main()
