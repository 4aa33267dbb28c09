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

__all__ = ["answer_pid", "warm_up", "with_pid"]

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


def warm_up(app: WSGIApp, paths: Iterable[str]) -> None:
    """Send a GET for each path through ``app`` in this process (BENCH_WARMUP=1).

    Preloaded, this runs in the master before the fork: the first request's lazy imports,
    route and template compilation and SQLAlchemy's compiled statements end up in memory
    the workers share instead of being built again in each of them.
    """
    import io
    import sys

    for path in paths:
        route, _, query = path.partition("?")
        environ = {
            "REQUEST_METHOD": "GET", "PATH_INFO": route, "QUERY_STRING": query,
            "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr, "wsgi.multithread": False,
            "wsgi.multiprocess": True, "wsgi.run_once": False,
        }  # fmt: skip
        body = app(environ, lambda status, headers, *exc: None)
        try:
            b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
