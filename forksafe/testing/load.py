"""Concurrent HTTP load that checks every single answer.

``wrk`` measures throughput but cannot tell a right answer from another worker's; here every
request carries a unique number and its answer is compared with what that number must get
(`forksafe.testing.checks.validate_answer`). A request that times out, or whose connection
is dropped (its worker hung, crashed or was killed), counts as ``hung_or_killed``. The whole
run is bounded by a deadline: requests not sent by then count as hung too, so the load
always ends.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from forksafe.testing import checks

__all__ = ["Outcome", "classify_http", "run_load"]

#: one request's result: (n, category, message)
Outcome = tuple[int, str, str]


def classify_http(n: int, status: int, payload: bytes) -> tuple[str, str]:
    """Name the outcome of request ``n`` from its HTTP status and body.

    200 with exactly ``n``'s answer is ``ok``, any other 200 a wrong answer; 500 carries
    the app's own error category; a gateway error (502/503/504, a worker gone) counts as
    hung or killed; anything else is another error.
    """
    try:
        body: Any = json.loads(payload.decode("utf-8", "replace"))
    except ValueError:
        body = None
    if status == 200:
        category = checks.validate_answer(n, body)
        if category == checks.OK:
            return category, ""
        echo = body.get("echo") if isinstance(body, dict) else None
        return category, f"asked for {n}, got echo {echo!r}"
    if status == 500 and isinstance(body, dict) and "error" in body:
        category = str(body["error"])
        if category not in checks.ERROR_CATEGORIES:
            category = checks.OTHER
        return category, str(body.get("message", ""))[:300]
    if status in (502, 503, 504):
        return checks.HUNG, f"HTTP {status}"
    return checks.OTHER, f"HTTP {status}: {payload[:120]!r}"


def _one(host: str, port: int, n: int, timeout: float) -> Outcome:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", f"/?n={n}", headers={"Connection": "close"})
        response = conn.getresponse()
        payload = response.read()
        category, message = classify_http(n, response.status, payload)
        return n, category, message
    except TimeoutError:
        return n, checks.HUNG, f"no answer within {timeout:g} s"
    except (ConnectionError, http.client.HTTPException) as exc:
        return n, checks.HUNG, f"connection dropped: {type(exc).__name__}"
    except OSError as exc:
        return n, checks.OTHER, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def run_load(
    base_url: str,
    numbers: Sequence[int],
    concurrency: int,
    timeout: float,
    deadline: float,
) -> list[Outcome]:
    """Send ``GET /?n=<n>`` for every number, ``concurrency`` at a time, and judge each.

    Args:
        base_url: ``http://host:port`` of the server.
        numbers: the request-unique numbers (one request each).
        concurrency: client threads.
        timeout: seconds a single request may take.
        deadline: seconds the whole run may take; requests not started by then are not
            sent and count as hung.
    """
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    end = time.monotonic() + deadline
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def worker(n: int) -> None:
        if time.monotonic() > end:
            result: Outcome = (n, checks.HUNG, "not sent: the run's deadline passed")
        else:
            result = _one(host, port, n, timeout)
        with lock:
            outcomes.append(result)

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        for future in [pool.submit(worker, n) for n in numbers]:
            future.result()
    finally:
        # On Ctrl-C, drop the requests not started yet; those in flight end within timeout.
        pool.shutdown(wait=False, cancel_futures=True)
    return sorted(outcomes)
