"""The gunicorn worker: gthread (one process, one copy of the models, a few threads reading requests),
with every client read and write bounded in time.

Why this worker: the sync worker reads a request in its only thread with no timeout, so one idle or
slow client stalls every other client for TIMEOUT and then gets the worker killed. An async worker
would need an event-loop library and still block its loop during inference. gthread keeps one process
and reads requests in threads; the service runs inference one request at a time under a lock, so
activations never exceed what the build proves, while health checks and other reads go on. Added to
gunicorn's gthread here:

- a connection with no bytes waits in the poller, never in a thread (closed after KEEPALIVE seconds);
- a request (headers and body) must arrive within READ_TIMEOUT seconds of its first byte;
- each write of the response must complete within WRITE_TIMEOUT seconds (a client that never reads);
- an answer given before the body was read (a refusal: 413, 401, 415, ...) reaches a client that sends
  its whole body before reading, as most do: the rest of the body is read and thrown away, up to
  MAX_DISCARD_BYTES and within the request's READ_TIMEOUT, and the connection is kept. Closed with
  bytes unread, the connection is reset, and the reset loses the answer. A body declared longer is
  answered with Connection: close and not read;
- after that, reads take only what has already arrived: gunicorn drains a closing connection on its
  main thread, so a client that neither sends nor closes would stall every other.

A slow client therefore holds one thread for at most READ_TIMEOUT (or WRITE_TIMEOUT) seconds; more
simultaneous slow clients than THREADS - 1 need a buffering proxy in front (see README).

A worker that is stopping (MAX_REQUESTS reached, or the memory watchdog) keeps polling until its last
request ends. It accepts no new connection in that time: they wait in the listen queue, which the master
keeps open, for the next worker. A connection it had already accepted, with no bytes yet, waits for its
request in a thread (READ_TIMEOUT at most), because a stopping worker parks nothing in its poller:
gunicorn closes such a connection unanswered.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from typing import Any

from gunicorn.http.errors import NoMoreData, ParseException
from gunicorn.workers.gthread import _DEFER, ThreadWorker

log = logging.getLogger("memfit.serve")
READ_TIMEOUT_S = float(os.environ.get("READ_TIMEOUT", "10"))
WRITE_TIMEOUT_S = float(os.environ.get("WRITE_TIMEOUT", "10"))
MAX_DISCARD_BYTES = int(os.environ.get("MAX_DISCARD_BYTES", str(64 << 20)))
DISCARD_STEP = 64 << 10


class ClientTooSlow(NoMoreData, TimeoutError):
    """A request that did not arrive within READ_TIMEOUT. gunicorn closes the connection quietly when it
    is raised while reading headers; the service answers 408 when it is raised while reading a body."""

    def __str__(self) -> str:
        return f"request not received within READ_TIMEOUT ({READ_TIMEOUT_S:g} s)"


class DeadlineSocket:
    """A client socket whose reads share one deadline per request and whose writes each get
    WRITE_TIMEOUT; everything else is the socket's own."""

    def __init__(self, sock: socket.socket, peer: Any):
        self._sock = sock
        self._peer = peer
        self.read_deadline = math.inf
        self.request: Any = None  # the gunicorn request being read, closed after its answer if too slow

    def start_request(self) -> None:
        self.read_deadline = time.monotonic() + READ_TIMEOUT_S

    def _bounded(self, seconds: float) -> float | None:
        """Set the socket timeout to at most `seconds`; returns the timeout to restore."""
        prior = self._sock.gettimeout()
        if prior != 0.0:  # non-blocking mode (the poller's) is left alone
            self._sock.settimeout(seconds if prior is None else min(prior, seconds))
        return prior

    def recv(self, size: int, *flags: int) -> bytes:
        if self.read_deadline == math.inf:  # answered: what is read now is a drain, never a wait
            return self._arrived(size)
        remaining = self.read_deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_slow()
        prior = self._bounded(remaining)
        try:
            return self._sock.recv(size, *flags)
        except TimeoutError:
            raise self._too_slow() from None
        finally:
            self._sock.settimeout(prior)

    def _arrived(self, size: int) -> bytes:
        """Up to `size` bytes the client has already sent; a timeout (which ends gunicorn's drain, quietly)
        when there are none."""
        prior = self._sock.gettimeout()
        self._sock.settimeout(0.0)  # a socket with a timeout polls before it reads, whatever the flags
        try:
            return self._sock.recv(size)
        except BlockingIOError:
            raise TimeoutError("nothing more sent") from None
        finally:
            self._sock.settimeout(prior)

    def sendall(self, data: bytes, *flags: int) -> None:
        prior = self._bounded(WRITE_TIMEOUT_S)
        try:
            self._sock.sendall(data, *flags)
        except TimeoutError:
            log.warning(
                "client %s did not read its response within WRITE_TIMEOUT (%g s); closed", self._peer, WRITE_TIMEOUT_S
            )
            raise BrokenPipeError(errno.EPIPE, "client stopped reading") from None
        finally:
            self._sock.settimeout(prior)

    def send(self, data: bytes, *flags: int) -> int:
        self.sendall(data, *flags)
        return len(data)

    def _too_slow(self) -> ClientTooSlow:
        if self.request is not None:
            self.request.must_close = True  # the unread rest of the body must not be parsed as a request
        log.warning("client %s sent no complete request within READ_TIMEOUT (%g s); closed", self._peer, READ_TIMEOUT_S)
        return ClientTooSlow()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BoundedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker with the time bounds above (`worker_class` in serve/gunicorn.conf.py)."""

    def accept(self, listener: Any) -> None:
        if self.alive:
            super().accept(listener)

    def handle(self, conn: Any) -> Any:
        if not conn.initialized and not conn.data_ready:
            if self.alive and not conn.wait_for_data(0):
                return _DEFER  # nothing sent yet: wait in the poller, not in a thread
            if not self.alive and not conn.wait_for_data(READ_TIMEOUT_S):
                return False
        if not isinstance(conn.sock, DeadlineSocket):
            conn.sock = DeadlineSocket(conn.sock, conn.client)
        conn.sock.start_request()
        return super().handle(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        if not self.alive and not fs.cancelled() and fs.exception() is None and fs.result() is _DEFER:
            self.enqueue_req(conn)  # deferred just before the worker began stopping: wait in a thread
            return
        super().finish_request(conn, fs)

    def handle_request(self, req: Any, conn: Any) -> bool:
        conn.sock.request = req
        if too_long_to_discard(req.body):
            req.must_close = True  # the answer says the connection closes
        try:
            return bool(super().handle_request(req, conn))
        finally:
            conn.sock.request = None

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        """Answered: the rest of the body is thrown away (see the module's docstring) while reads may still
        wait for the request's READ_TIMEOUT; the connection is kept only if it ended."""
        try:
            ended = discard(conn.parser.mesg.body)
        finally:
            # What gunicorn reads next is a drain before closing, which takes only what has arrived, or
            # the next request, bounded again by `handle`. Left set, a request that waited for the
            # inference lock past READ_TIMEOUT was logged as too slow on close.
            conn.sock.read_deadline = math.inf
        return bool(super()._keepalive_after(conn, keepalive and ended))


def discard(body: Any) -> bool:
    """Read what is left of a request body, keeping none of it; whether it ended within MAX_DISCARD_BYTES
    and the request's READ_TIMEOUT. A body that says it is longer is not read at all."""
    if getattr(body, "failed", False):  # reading it raised: where the next request starts is unknown
        return False
    if too_long_to_discard(body):
        return False
    discarded = 0
    try:
        while discarded <= MAX_DISCARD_BYTES:
            step = body.read(DISCARD_STEP)
            if not step:
                return True
            discarded += len(step)
    except (OSError, ParseException):  # too slow (READ_TIMEOUT), gone, or a malformed chunk: closed
        return False
    return False


def too_long_to_discard(body: Any) -> bool:
    """A body whose Content-Length is over MAX_DISCARD_BYTES: answered, then closed unread."""
    return bool(getattr(body.reader, "length", 0) > MAX_DISCARD_BYTES)
