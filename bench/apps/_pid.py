"""What the benchmark apps share: ``GET /_pid?hold=SECONDS`` and an ``X-Pid`` header.

Holding each ``/_pid`` request (at most 0.2 s) makes concurrent requests spread over every
worker, so a benchmark can wait until all of them answer. `with_pid` adds ``X-Pid: <the
worker's pid>`` to every response, so that a load generator can count the requests each
worker served (bench/wrk_memory.lua does).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

__all__ = ["answer_pid", "with_pid"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def answer_pid(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes] | None:
    """The ``/_pid`` response, or None when the request is for something else."""
    if environ.get("PATH_INFO") != "/_pid":
        return None
    hold = parse_qs(environ.get("QUERY_STRING", "")).get("hold", ["0"])[0]
    time.sleep(min(max(float(hold), 0.0), 0.2))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


def with_pid(app: WSGIApp) -> WSGIApp:
    """``app`` answering ``/_pid`` itself and adding ``X-Pid`` to every response."""

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            return start_response(status, [*headers, ("X-Pid", str(os.getpid()))], *exc_info)

        pid = answer_pid(environ, start)
        if pid is not None:
            return pid
        return app(environ, start)

    return application
