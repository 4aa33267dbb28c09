"""The Flask example (examples/flask_app) plus ``GET /_pid``, for the benchmarks.

Importing this module imports the example, exactly as its own configs do: in the master
before the fork (gunicorn ``preload_app``, uWSGI without ``lazy-apps``) or in every worker
(lazy). ``/_pid?hold=SECONDS`` answers the worker's pid after holding it that long (at most
0.2 s), so that concurrent requests reach every worker; everything else goes to the example.
The example reads ``DATABASE_URL`` and the ``BENCH_POOL`` / ``BENCH_FORKSAFE`` knobs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from _pid import answer_pid
from app import app as example  # examples/flask_app/app.py (the server's chdir)

__all__ = ["application"]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The example's WSGI app, with ``/_pid`` in front."""
    pid = answer_pid(environ, start_response)
    if pid is not None:
        return pid
    return example(environ, start_response)
