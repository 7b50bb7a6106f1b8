"""HTTP faults against real gunicorn: protocol abuse, stuck requests, shutdown, worker recycling."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.memory.harness import GunicornService, Response
from serve.artifacts import load_approved
from tests.conftest import TinyRun
from tests.helpers import REPO

pytestmark = pytest.mark.reliability
SLOW_APP = "tests.reliability.slow_app:create_app()"


def wait_for(mark: Path, timeout: float = 30.0) -> None:
    """Until the slow app has created `mark` (it has the request): a fixed sleep is too short on a busy machine."""
    deadline = time.monotonic() + timeout
    while not mark.exists():
        assert time.monotonic() < deadline, f"the worker never took the request ({mark})"
        time.sleep(0.02)


def raw_request(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(data)
        answer = connection.recv(4096)
    return int(answer.split(b" ", 2)[1])


def test_protocol_limits_answer_4xx_and_the_worker_survives(tiny_run: TinyRun) -> None:
    with GunicornService(tiny_run.service) as service:
        pid = service.worker_pids()[0]
        long_line = b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert raw_request(service.port, long_line) == 414  # gunicorn: request line over limit_request_line
        headers = b"".join(f"X-H{i}: v\r\n".encode() for i in range(150))
        assert raw_request(service.port, b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n") == 431
        assert raw_request(service.port, b"NOT HTTP AT ALL\r\n\r\n") == 400
        reply = service.request("GET", "/api/health")
        assert reply.status == 200 and reply.body["pid"] == pid
        assert service.worker_pids() == [pid]


def test_a_stuck_request_holds_one_thread_not_the_service(tiny_run: TinyRun) -> None:
    """A request slower than every timeout occupies one thread; health, readiness and inference go on."""
    with GunicornService(tiny_run.service, app=SLOW_APP) as service:
        pid = service.worker_pids()[0]
        stuck = threading.Thread(target=lambda: service.request("GET", "/test/sleep?s=8", timeout=30), daemon=True)
        stuck.start()
        time.sleep(0.3)
        ready = service.request("GET", "/api/ready")
        assert ready.status == 200 and ready.seconds < 1
        assert service.request("POST", "/api/embed", {"inputs": ["meanwhile"]}).status == 200
        assert service.worker_pids() == [pid]
        stuck.join(timeout=20)


def test_a_request_answered_after_read_timeout_is_not_logged_as_too_slow(tiny_run: TinyRun) -> None:
    """READ_TIMEOUT bounds reading a request, not answering it: a request that arrived at once and was
    answered 3 s later (as one waiting for the inference lock) is closed without a timeout warning."""
    with GunicornService(tiny_run.service, app=SLOW_APP, env={"READ_TIMEOUT": "1"}) as service:
        reply = service.request("GET", "/test/sleep?s=3", headers={"Connection": "close"}, timeout=30)
        assert reply.status == 200
    # Read once the service has stopped: the close (gunicorn drains before it) follows the answer.
    assert "READ_TIMEOUT" not in service.log()


def test_a_slow_body_gets_408_and_an_idle_connection_is_closed(tiny_run: TinyRun) -> None:
    env = {"READ_TIMEOUT": "2", "KEEPALIVE": "2"}
    with GunicornService(tiny_run.service, env=env) as service:
        head = b"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as slow:
            slow.sendall(head + b'{"inputs": [')
            started = time.monotonic()
            answer = b"".join(iter(lambda: slow.recv(4096), b""))  # until the server closes
            assert 1.5 < time.monotonic() - started < 6  # READ_TIMEOUT 2 s, at most 3× over
            assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer
            assert b"READ_TIMEOUT" in answer
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(4096) == b""  # closed by the server, having sent nothing
            assert time.monotonic() - started < 6  # KEEPALIVE 2 s, at most 3× over
        assert service.request("GET", "/api/ready").status == 200


def test_watchdog_recycles_a_worker_over_its_proven_peak(tiny_run: TinyRun) -> None:
    """A request that leaves memory behind is answered; the worker then exits and a fresh one takes over.
    The recycle is logged and counted in /api/health across worker generations."""
    with GunicornService(tiny_run.service, app=SLOW_APP) as service:
        old = service.worker_pids()[0]
        watchdog = service.request("GET", "/api/health").body["watchdog"]
        assert watchdog["recycles"] == 0 and watchdog["limit_mb"] > watchdog["proven_peak_mb"] > 0
        held = int(watchdog["limit_mb"]) + 50
        assert service.request("GET", f"/test/hold?mb={held}").status == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and service.worker_pids() in ([old], []):
            time.sleep(0.1)
        service.wait_until(200)
        health = service.request("GET", "/api/health").body
        assert health["pid"] != old and health["rss_mb"] < watchdog["limit_mb"]
        assert health["watchdog"]["recycles"] == 1 and health["watchdog"]["last_recycle"]["pid"] == old
        assert "recycling after this request" in service.log()


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(tiny_run: TinyRun, tmp_path: Path) -> None:
    service = GunicornService(tiny_run.service, env={"GRACEFUL_TIMEOUT": "10"}, app=SLOW_APP).start()
    replies: list[Response] = []
    mark = tmp_path / "taken"
    worker = threading.Thread(target=lambda: replies.append(service.request("GET", f"/test/sleep?s=2&mark={mark}")))
    worker.start()
    wait_for(mark)  # the request is in flight
    assert service.process is not None
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    code = service.process.wait(timeout=20)
    worker.join(timeout=5)
    assert replies and replies[0].status == 200, "the in-flight request must complete"
    assert code == 0
    assert time.monotonic() - started < 10
    service.stop()  # already exited: this keeps its log and removes the file
    log = service.log()
    assert "Worker exiting" in log and "was sent" not in log and "terminate called" not in log, log[-2000:]


def test_a_worker_keeps_its_exit_code_so_a_broken_app_stops_the_master(tiny_run: TinyRun) -> None:
    """Workers end without the interpreter's teardown (serve/gunicorn.conf.py, worker_exit), yet with their
    own exit code: gunicorn's app-load failure (4) stops the master instead of a respawn loop."""
    service = GunicornService(tiny_run.service, app="serve.app:no_such_factory()", wait_ready=False)
    process = subprocess.run(
        service.command(), cwd=REPO, env=service.env, capture_output=True, text=True, timeout=120, check=False
    )
    assert process.returncode == 4, process.stderr[-2000:]
    assert "exited with code 4" in process.stderr and "App failed to load" in process.stderr


def test_a_connection_opened_while_the_worker_stops_is_served_by_the_next_worker(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    """A worker that is about to recycle (MAX_REQUESTS, or the watchdog) still polls its listener until its
    last request ends. A client that connects meanwhile and sends a moment later must get an answer from
    the next worker, not a closed connection."""
    env = {"MAX_REQUESTS": "1", "MAX_REQUESTS_JITTER": "0"}
    mark = tmp_path / "taken"
    with GunicornService(tiny_run.service, env=env, app=SLOW_APP) as service:
        old = service.worker_pids()[0]
        path = f"/test/sleep?s=3&mark={mark}"
        last = threading.Thread(target=lambda: service.request("GET", path, timeout=30))
        last.start()
        wait_for(mark)  # the worker has taken its last request and is stopping after it
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as late:
            time.sleep(0.3)  # connected, request not yet sent
            late.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b"".join(iter(lambda: late.recv(65536), b""))
        last.join(timeout=30)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert f'"pid":{old}'.encode() not in answer.replace(b" ", b"")


def test_max_requests_recycles_without_failures_and_reverifies(tiny_copy: TinyRun) -> None:
    env = {"MAX_REQUESTS": "20", "MAX_REQUESTS_JITTER": "0"}
    with GunicornService(tiny_copy.service, env=env) as service:
        pids, statuses = set(), []
        for index in range(120):
            if index % 2:
                reply = service.request("GET", "/api/health")
                pids.add(reply.body["pid"])
            else:
                reply = service.request("POST", "/api/embed", {"inputs": ["recycled"] * (1 + index % 8)})
            statuses.append(reply.status)
        assert statuses == [200] * 120
        assert len(pids) >= 5, f"expected several recycled workers, saw {pids}"
        # A replacement worker re-verifies checksums: damage the model and the next worker refuses it.
        model = load_approved(tiny_copy.artifacts / "tiny-embed").folder / "model.onnx"
        data = bytearray(model.read_bytes())
        data[100] ^= 0xFF
        Path(model).write_bytes(bytes(data))
        for _ in range(40):
            service.request("GET", "/api/health")
        reply = service.request("GET", "/api/ready")
        assert reply.status == 503 and "model.onnx" in reply.body["error"]["message"]
