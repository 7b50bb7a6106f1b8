"""Bounded concurrent load from a second process: `python -m benchmarks.load PORT REQUESTS_JSON CONCURRENCY`
posts every request of the file (each a list of texts) to /api/embed with that many clients in flight,
and prints one JSON line: requests, seconds, requests_per_s, failures."""

from __future__ import annotations

import http.client
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def post(port: int, texts: list[str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        body = json.dumps({"inputs": texts}).encode()
        connection.request("POST", "/api/embed", body=body, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        return reply.status
    finally:
        connection.close()


def main() -> None:
    port, path, concurrency = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    requests = json.loads(path.read_text())
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(lambda texts: post(port, texts), requests))
    seconds = time.perf_counter() - started
    failures = [s for s in statuses if s != 200]
    result = {"requests": len(requests), "seconds": round(seconds, 2), "failures": failures}
    print(json.dumps({**result, "requests_per_s": round(len(requests) / seconds, 3)}))


if __name__ == "__main__":
    main()
