"""Run the real service under gunicorn on 127.0.0.1 and measure it: RSS/PSS of master and worker
sampled from /proc while a bounded request mix runs. Used by `memfit serve-bench` and the tests."""

from __future__ import annotations

import contextlib
import http.client
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.memory.cgroup import MemoryCgroup
from pipeline.memory.probe import PROJECT_ROOT
from serve.memory import rollup_mb, status_mb

WORDS = (
    "the film is a quiet and funny story about memory love loss family music city night road friends war "
    "summer house water light dark old young great small never always again every little world"
).split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


PRESENT = np.uint64(1 << 63)  # /proc/<pid>/pagemap: bit 63, the page is resident; bits 0-54, its frame
FILE_OR_SHARED = np.uint64(1 << 61)  # bit 61: a file page or shared anonymous memory (not private anon)
FRAME = np.uint64((1 << 55) - 1)
USER_SPACE_END = 1 << 47  # above it only [vsyscall], which pagemap does not describe


def mapped_ranges(pid: int, files: Container[str] | None = None) -> Iterator[tuple[str, int, np.ndarray]]:
    """Each user-space mapping of `pid` (only those of `files`, real paths, where given): its file ("" for
    anonymous memory), the page of the file it starts at, and its page-table entries (/proc/PID/pagemap)."""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) == 6 else ""
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if start >= USER_SPACE_END or (files is not None and path not in files):
                continue
            pagemap.seek(start // mmap.PAGESIZE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // mmap.PAGESIZE * 8), dtype=np.uint64)
            yield path, int(fields[2], 16) // mmap.PAGESIZE, entries


def resident_frames(pid: int, file_only: bool = False) -> np.ndarray:
    """Physical frame numbers of the resident pages `pid` maps (`file_only`: of its file and shared
    anonymous pages). The kernel shows them to CAP_SYS_ADMIN only; to anyone else they read as zero."""
    wanted = PRESENT | (FILE_OR_SHARED if file_only else np.uint64(0))
    frames = [np.empty(0, np.uint64)]
    for _, _, entries in mapped_ranges(pid):
        frames.append(entries[(entries & wanted) == wanted] & FRAME)
    return np.concatenate(frames)


def mapped_pages(pids: Iterable[int], files: Container[str]) -> dict[str, set[int]]:
    """Of `files` (real paths), the pages (by index in the file) that the processes `pids` have mapped now.
    A process that has exited meanwhile is left out."""
    pages: dict[str, set[int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for path, first, entries in mapped_ranges(pid, files):
                pages.setdefault(path, set()).update((first + np.flatnonzero(entries & PRESENT)).tolist())
    return pages


def own_pages_mb(pids: list[int], file_only: bool = False) -> float | None:
    """MB of the distinct resident pages `pids` map (`file_only`: file and shared anonymous pages): each
    page once, however many processes, inside or outside `pids`, map it. This is what a container
    holding only these processes holds in mapped memory; a PSS sum gives away the share of every page a
    process outside maps too (the build process maps onnxruntime, numpy and Python's own libraries: 7.6 MB
    of an idle MiniLM service's 166.4). None where frame numbers are hidden (not CAP_SYS_ADMIN)."""
    frames = np.concatenate([resident_frames(pid, file_only) for pid in pids])
    if frames.size and not frames.any():
        return None
    return float(np.unique(frames).size * mmap.PAGESIZE / 2**20)


def file_pages_mb(master_pid: int) -> float | None:
    """The distinct file and shared pages the service (master and workers) maps: its libraries and
    memory-mapped weights, the part of its own pages that outside processes can map too. None where
    frame numbers are hidden."""
    return own_pages_mb([master_pid, *children(master_pid)], file_only=True)


@dataclass
class Response:
    status: int
    body: Any
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""


class GunicornService:
    """`gunicorn -c serve/gunicorn.conf.py` on a free loopback port; stopped (SIGTERM) on exit."""

    def __init__(
        self,
        service_config: Path,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        ready_timeout: float = 120.0,
        app: str = "serve.app:create_app()",
        config_file: Path = PROJECT_ROOT / "serve" / "gunicorn.conf.py",
        wait_ready: bool = True,
        cgroup: MemoryCgroup | None = None,
    ):
        self.app = app
        self.wait_ready = wait_ready  # False: return once /api/ready answers at all (a 503 included)
        self.cgroup = cgroup  # the master joins it before exec; its workers follow
        self.config_file = config_file
        self.cold_start_s: float | None = None  # process start to the first ready answer
        self.port = free_port()
        self.service_config = service_config
        self.env = {**os.environ, "SERVICE_CONFIG": str(service_config), "WORKERS": "1", **(env or {})}
        self.python = python
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"memfit-gunicorn-{os.getpid()}-{self.port}.log"
        self.stopped_log = ""  # the log's text once the service has stopped and its file is removed

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "gunicorn",
            "-c",
            str(self.config_file),
            "--bind",
            f"127.0.0.1:{self.port}",
            self.app,
        ]

    def start(self, wait_ready: bool = True) -> GunicornService:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command(),
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=log,
            stderr=log,
            preexec_fn=self.cgroup.join if self.cgroup else None,
        )
        self.cold_start_s = self.wait_until(200 if wait_ready else None)
        return self

    def wait_until(self, ready_status: int | None) -> float:
        """Seconds until /api/ready answers `ready_status` (any answer when None)."""
        assert self.process is not None
        started = time.monotonic()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # keeps the log
                raise RuntimeError(f"gunicorn exited {self.process.returncode}: {self.log()[-2000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status = self.request("GET", "/api/ready").status
                if ready_status is None or status == ready_status:
                    return time.monotonic() - started
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"service not ready within {self.ready_timeout} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else self.stopped_log

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the log is kept in memory and its file removed."""
        try:
            return self.terminate(timeout)
        finally:
            if self.log_path.exists():
                self.stopped_log = self.log_path.read_text(errors="replace")
                self.log_path.unlink()

    def terminate(self, timeout: float) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> GunicornService:
        return self.start(self.wait_ready)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def master_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        return children(self.master_pid)

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> int:
        """Wait until the master has `count` workers (or `timeout` passed); how many it has."""
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # a master that starts more than `count` would show them by now
        return len(self.worker_pids())

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        timeout: float = 60.0,
    ) -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        sent_headers = {"Content-Type": "application/json", **(headers or {})}
        started = time.perf_counter()
        try:
            connection.request(method, path, body=payload, headers=sent_headers)
            reply = connection.getresponse()
            data = reply.read()
        finally:
            connection.close()
        seconds = time.perf_counter() - started
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode(errors="replace")
        return Response(reply.status, parsed, seconds, dict(reply.getheaders()), data)


# One smaps_rollup read of a loaded worker takes ~8 ms, so sampling every 10 ms kept a sampler busy on
# most of a core, ahead of the workers it measures. Every 50 ms: the same PSS peaks (2 MiniLM workers:
# 368.7–369.5 MB vs 369.0–370.7 MB) and their fit run 19% faster (32 s vs 39.5 s).
SAMPLE_INTERVAL_S = 0.05
# Concurrent soak clients: the worker reads their bodies while it runs another's inference, as in traffic.
SOAK_CLIENTS = 4


@dataclass
class MemorySampler:
    """Samples RSS and PSS of the master and its workers every `interval` seconds in a thread, and the
    service's own pages: its private anonymous pages, which only master and workers can map, so that their
    PSS sum counts each once whatever runs beside them, plus its distinct file and shared pages, read
    frame by frame when the sampler starts and ends. Those are libraries and mapped weights, not the
    activations that make the peak; reading every frame takes 33 ms for one MiniLM worker and 99 for
    four, too slow to sample every 50 ms. The PSS sum moves with the processes outside that map the same
    libraries, and a build forks probes that come and go, so own pages are not taken from it."""

    master_pid: int
    interval: float = SAMPLE_INTERVAL_S
    samples: list[dict[str, float]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    file_pages: list[float | None] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> dict[str, float]:
        master = rollup_mb(self.master_pid)
        workers = [rollup_mb(pid) for pid in children(self.master_pid)]
        figures = {
            "master_rss": master["rss"],
            "master_pss": master["pss"],
            "worker_rss": sum(w["rss"] for w in workers),
            "worker_pss": sum(w["pss"] for w in workers),
            "total_rss": master["rss"] + sum(w["rss"] for w in workers),
            "total_pss": master["pss"] + sum(w["pss"] for w in workers),
        }
        anon = [rollup.get("pss_anon") for rollup in (master, *workers)]
        if None not in anon:  # where the kernel shows Pss_Anon
            figures["total_anon"] = sum(mb for mb in anon if mb is not None)
        return figures

    def _run(self) -> None:
        with contextlib.suppress(OSError, KeyError):
            self.file_pages.append(file_pages_mb(self.master_pid))
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(self.sample())
                self.times.append(time.monotonic())
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with contextlib.suppress(OSError, KeyError):
            self.file_pages.append(file_pages_mb(self.master_pid))

    def peak(self) -> dict[str, float]:
        """The peak of each figure sampled, and `total_own`: the service's own pages at the peak of its
        anonymous pages (absent where frame numbers are hidden)."""
        peak = {key: round(max(s[key] for s in self.samples), 1) for key in self.samples[0]}
        file_pages = [mb for mb in self.file_pages if mb is not None]
        if file_pages and "total_anon" in peak:
            peak["total_own"] = round(peak["total_anon"] + max(file_pages), 1)
        return peak

    def max_gap_ms(self) -> float:
        """Longest time between two samples: a peak shorter than this could go unseen."""
        gaps = np.diff(self.times) if len(self.times) > 1 else np.array([0.0])
        return round(float(gaps.max()) * 1000, 1)


def request_mix(
    count: int, max_batch: int, max_seq_len: int, seed: int = 0, worst_every: int = 10, max_words: int | None = None
) -> list[list[str]]:
    """`count` requests of 1..max_batch texts, 1..max_seq_len-2 words (one token each for these words;
    at most `max_words`); every `worst_every`-th request is the worst case the service accepts:
    max_batch × max_seq_len tokens."""
    rng = random.Random(seed)
    longest = min(max_seq_len - 2, max_words or max_seq_len)
    requests = []
    for index in range(count):
        if index % worst_every == 0:
            requests.append([" ".join(rng.choice(WORDS) for _ in range(max_seq_len - 2))] * max_batch)
            continue
        batch = rng.randint(1, max_batch)
        requests.append([" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) for _ in range(batch)])
    return requests


def run_mix(service: GunicornService, path: str, requests: list[list[str]], model: str | None = None) -> dict[str, Any]:
    """Send `requests` one after another; latency percentiles, throughput and any non-200 answers."""
    latencies, failures = [], []
    started = time.perf_counter()
    for inputs in requests:
        body: dict[str, Any] = {"inputs": inputs} | ({"model": model} if model else {})
        reply = service.request("POST", path, body)
        latencies.append(reply.seconds * 1000)
        if reply.status != 200:
            failures.append((reply.status, reply.body))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(requests),
        "failures": failures,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p95_ms": round(float(np.percentile(latencies, 95)), 2),
        "requests_per_s": round(len(requests) / elapsed, 2),
    }


def soak(
    service: GunicornService, path: str, requests: list[list[str]], every: int = 100, clients: int = SOAK_CLIENTS
) -> dict[str, Any]:
    """Run `requests` from `clients` concurrent clients against one worker, sampling its RSS every `every`
    answers: status counts, peak, and the RSS trend over the last half (MB per 1,000 requests; a leak
    shows as a positive slope)."""
    statuses: dict[int, int] = {}
    trend: list[tuple[int, float]] = []
    counted = threading.Lock()

    def send(inputs: list[str]) -> None:
        try:
            status = service.request("POST", path, {"inputs": inputs}).status
        except OSError:
            status = 599  # no answer at all counts as a server failure
        with counted:
            answered = sum(statuses.values())
            statuses[status] = statuses.get(status, 0) + 1
            if answered % every == 0:
                trend.append((answered, sum(rollup_mb(pid)["rss"] for pid in service.worker_pids())))

    with MemorySampler(service.master_pid) as sampler, ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, requests))
    half = [(i, rss) for i, rss in trend if i >= len(requests) // 2]
    slope = float(np.polyfit([i for i, _ in half], [r for _, r in half], 1)[0]) * 1000
    return {
        "requests": len(requests),
        "clients": clients,
        "statuses": statuses,
        "server_errors": sum(n for status, n in statuses.items() if status >= 500),
        "peak": sampler.peak(),
        "max_sample_gap_ms": sampler.max_gap_ms(),
        "rss_first_mb": round(trend[0][1], 1),
        "rss_last_mb": round(trend[-1][1], 1),
        "slope_mb_per_1k_requests": round(slope, 3),
    }


ENDPOINTS = {"feature-extraction": "/api/embed", "text-classification": "/api/classify"}


def serve_bench(service_config: Path, requests: int = 500, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Idle and peak RSS/PSS of master + worker, latency and throughput while every served model gets
    `requests` mixed requests, interleaved across models, every 10th the largest the service accepts."""
    from serve.config import load_service_config

    config, _ = load_service_config(service_config)
    limits = config.limits
    with GunicornService(service_config, env=env) as service:
        time.sleep(0.5)
        idle = MemorySampler(service.master_pid).sample()
        models = service.request("GET", "/api/models").body["models"]
        mixes = [request_mix(requests, limits.max_batch, limits.max_seq_len, seed=i) for i in range(len(models))]
        latencies: dict[str, list[float]] = {m["name"]: [] for m in models}
        failures: list[tuple[str, int, Any]] = []
        started = time.perf_counter()
        with MemorySampler(service.master_pid) as sampler:
            for index in range(requests):
                for model, mix in zip(models, mixes, strict=True):
                    body = {"inputs": mix[index], "model": model["name"]}
                    reply = service.request("POST", ENDPOINTS[model["task"]], body)
                    latencies[model["name"]].append(reply.seconds * 1000)
                    if reply.status != 200:
                        failures.append((model["name"], reply.status, reply.body))
        elapsed = time.perf_counter() - started
        worker_hwm = status_mb("VmHWM", service.worker_pids()[0])
    every = [ms for values in latencies.values() for ms in values]
    peak = sampler.peak()
    return {
        "idle": {key: round(value, 1) for key, value in idle.items()},
        "peak": peak,
        "worker_vmhwm_mb": round(worker_hwm, 1),
        "samples": len(sampler.samples),
        "max_sample_gap_ms": sampler.max_gap_ms(),
        "budget_mb": config.budget_mb,
        "fits": peak["total_rss"] <= config.budget_mb,
        "largest_request": f"{limits.max_batch} x {limits.max_seq_len} tokens",
        "requests": len(every),
        "requests_per_s": round(len(every) / elapsed, 2),
        "p50_ms": round(float(np.percentile(every, 50)), 2),
        "p95_ms": round(float(np.percentile(every, 95)), 2),
        "failures": failures,
        "models": {
            name: {
                "requests": len(values),
                "p50_ms": round(float(np.percentile(values, 50)), 2),
                "p95_ms": round(float(np.percentile(values, 95)), 2),
            }
            for name, values in latencies.items()
        },
    }
