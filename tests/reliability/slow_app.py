"""Test-only WSGI wrapper: the real service plus `/test/sleep?s=N`, a request slower than any timeout.

Kept out of serve/ so no deployed code path can sleep on request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from serve.app import create_app as create_service


def create_app() -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    service = create_service()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/test/sleep":
            seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
            time.sleep(seconds)
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"slept": true}']
        return service(environ, start_response)

    return app
