"""Test-only WSGI wrapper: the real service plus `/test/sleep?s=N` (a request slower than any timeout;
with `&mark=PATH` it first creates PATH, so a test knows the worker has it) and `/test/hold?mb=N` (a
request that leaves N MB resident, as a leak would).

Kept out of serve/ so no deployed code path can sleep or hold memory on request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from serve.app import create_app as create_service

HELD: list[bytes] = []


def create_app() -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    service = create_service()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if environ.get("PATH_INFO") == "/test/sleep":
            if "mark" in query:
                Path(query["mark"][0]).touch()
            time.sleep(float(query.get("s", ["1"])[0]))
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"slept": true}']
        if environ.get("PATH_INFO") == "/test/hold":
            HELD.append(b"x" * (int(query.get("mb", ["1"])[0]) << 20))
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"held": true}']
        return service(environ, start_response)

    app.watchdog = service.watchdog  # type: ignore[attr-defined]  # read by gunicorn's post_request hook
    return app
