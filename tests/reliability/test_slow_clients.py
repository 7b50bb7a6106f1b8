"""Slow and idle clients cannot starve the service: 8 connections that stay idle, trickle their headers
or body at 1 byte/s, never read their response, or neither send nor close after an answer that closes
the connection, against the real MiniLM service. A normal client's
/api/embed p50 stays within 2× of the unloaded figure, /api/ready answers within 1 s, and the worker
stays within its proven peak (+5%)."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pipeline.memory.harness import GunicornService
from serve.artifacts import load_approved
from serve.memory import status_mb
from tests.conftest import MinilmRun
from tests.helpers import REPO

pytestmark = pytest.mark.reliability
SERVICE = REPO / "configs" / "service.yaml"
CONNECTIONS = 8
SCENARIO_S = 12.0  # longer than READ_TIMEOUT (here 5 s): tricklers are cut off and come back
NORMAL = json.dumps({"inputs": ["a quiet, funny film about memory"]}).encode()
BIG_ANSWER = json.dumps({"inputs": ["x"] * 32}).encode()  # a cheap request with a ~250 KB answer


def open_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def idle(sock: socket.socket, stop: threading.Event) -> None:
    stop.wait(SCENARIO_S)


def trickle_headers(sock: socket.socket, stop: threading.Event) -> None:
    for byte in b"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n":
        if stop.wait(1.0):
            return
        sock.sendall(bytes([byte]))


def head(body: bytes, *extra: str) -> bytes:
    lines = ["POST /api/embed HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def trickle_body(sock: socket.socket, stop: threading.Event) -> None:
    sock.sendall(head(NORMAL))
    for byte in NORMAL:
        if stop.wait(1.0):
            return
        sock.sendall(bytes([byte]))


def never_read(sock: socket.socket, stop: threading.Event) -> None:
    for _ in range(4):  # pipelined: answers pile up unread
        sock.sendall(head(BIG_ANSWER) + BIG_ANSWER)
    stop.wait(SCENARIO_S)


def linger_after_close(sock: socket.socket, stop: threading.Event) -> None:
    """Asks for the connection to close, then neither sends nor closes: the server's drain before closing
    finds nothing to read, and must not wait for it."""
    sock.sendall(head(NORMAL, "Connection: close") + NORMAL)
    stop.wait(SCENARIO_S)


def hostile(port: int, behave: Callable[[socket.socket, threading.Event], None], stop: threading.Event) -> None:
    """One slow client, reconnecting whenever the server closes it, until `stop`."""
    while not stop.is_set():
        with contextlib.suppress(OSError), open_connection(port) as sock:
            behave(sock, stop)
        stop.wait(0.2)


def normal_p50(service: GunicornService, seconds: float) -> tuple[float, float, int]:
    """(p50 ms of one-text /api/embed, slowest /api/ready ms, requests) over `seconds`."""
    embed, ready = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reply = service.request("POST", "/api/embed", raw=NORMAL, timeout=30)
        assert reply.status == 200, reply.body
        embed.append(reply.seconds * 1000)
        answer = service.request("GET", "/api/ready", timeout=30)
        assert answer.status == 200
        ready.append(answer.seconds * 1000)
        time.sleep(0.05)
    return statistics.median(embed), max(ready), len(embed)


@pytest.fixture(scope="module")
def service(minilm_run: MinilmRun) -> Iterator[GunicornService]:
    with GunicornService(SERVICE, env={**minilm_run.env, "READ_TIMEOUT": "5", "WRITE_TIMEOUT": "5"}) as running:
        yield running


SCENARIOS = {
    "idle": idle,
    "trickle-headers": trickle_headers,
    "trickle-body": trickle_body,
    "never-read": never_read,
    "linger-after-close": linger_after_close,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_slow_clients_do_not_starve_the_service(service: GunicornService, minilm_run: MinilmRun, scenario: str) -> None:
    proven = float(load_approved(minilm_run.artifacts / "minilm").manifest["metrics"]["peak_rss_mb"])
    unloaded, _, _ = normal_p50(service, 3.0)
    stop = threading.Event()
    clients = [
        threading.Thread(target=hostile, args=(service.port, SCENARIOS[scenario], stop), daemon=True)
        for _ in range(CONNECTIONS)
    ]
    for client in clients:
        client.start()
    try:
        time.sleep(0.5)
        loaded, slowest_ready, count = normal_p50(service, SCENARIO_S - 1)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=10)
    hwm = status_mb("VmHWM", service.worker_pids()[0])
    print(
        f"{scenario}: p50 {unloaded:.1f} -> {loaded:.1f} ms over {count} requests, slowest ready "
        f"{slowest_ready:.0f} ms, worker VmHWM {hwm:.1f} MB (proven {proven:.1f})"
    )
    assert loaded <= 2 * unloaded
    assert slowest_ready < 1000
    assert hwm <= proven * 1.05
