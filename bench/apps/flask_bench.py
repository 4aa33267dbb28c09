"""The Flask example (examples/flask_app) plus ``GET /_pid``, for the benchmarks.

Importing this module imports the example, exactly as its own configs do: in the master
before the fork (gunicorn ``preload_app``, uWSGI without ``lazy-apps``) or in every worker
(lazy). ``/_pid?hold=SECONDS`` answers the worker's pid after holding it that long (at most
0.2 s), so that concurrent requests reach every worker; everything else goes to the example.
The example reads ``DATABASE_URL`` and the ``BENCH_POOL`` / ``BENCH_FORKSAFE`` knobs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from app import app as example  # examples/flask_app/app.py (the server's chdir)

__all__ = ["application"]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The example's WSGI app, with ``/_pid`` in front."""
    if environ.get("PATH_INFO") == "/_pid":
        hold = parse_qs(environ.get("QUERY_STRING", "")).get("hold", ["0"])[0]
        time.sleep(min(max(float(hold), 0.0), 0.2))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    return example(environ, start_response)
