"""Warm a preloaded WSGI app in the master, so that what its first requests build is shared.

A worker's first requests build things every later request reuses: the app's lazy
imports, Werkzeug's compiled URL map and Jinja's compiled templates, SQLAlchemy's compiled
statements (each engine keeps a cache of them) and the ORM's loader strategies. Built in
each worker, they are private copies, and building them scatters allocations over pages
the worker shares with the master. Built once in the master before the fork, they are
shared by every worker. At the end of the module the server imports::

    from forksafe.preload import warm_up

    application = create_app()
    warm_up(application, ["/products/1.json", "/products?page=1"])

Measured in docs/BENCHMARKS.md (8 workers, ~4,000 requests per worker, total PSS, with
forksafe's ``gc.freeze()``): a warm-up of three requests took the Flask example from 0.48x
to 0.42x of the lazy memory on gunicorn (140 to 123 MiB) and from 0.47x to 0.41x on uWSGI
(141 to 126 MiB), and the heavier app from 0.23x to 0.21x (240 to 220 MiB, 237 to 216).
The Flask example (examples/flask_app) does it by default.

The requests run through the app in this process, with its database: pick read-only
paths. Connections they open in the master belong to tracked engines
(``forksafe.track``), which forksafe resets in every worker. Under ``lazy-apps`` / without
``preload_app`` each worker runs the warm-up itself, which only moves its first-request
latency to start-up.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["warm_up"]

logger = logging.getLogger("forksafe")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _environ(path: str, host: str) -> dict[str, Any]:
    route, _, query = path.partition("?")
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": route,
        "QUERY_STRING": query,
        "SERVER_NAME": host,
        "SERVER_PORT": "80",
        "HTTP_HOST": host,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def warm_up(app: WSGIApp, paths: Iterable[str], *, host: str = "localhost") -> list[str]:
    """Send ``GET path`` through the WSGI ``app`` in this process, for each path.

    Never raises: a request that fails is logged as a warning on the ``forksafe`` logger
    (the server starts anyway, only less warm) and its entry in the result says why.

    Args:
        app: the WSGI callable the server serves.
        paths: paths with an optional query string, e.g. ``"/products?page=1"``.
        host: the ``Host`` the requests carry.

    Returns:
        For each path, the response status (``"200 OK"``) or ``"error: ..."``.
    """
    statuses: list[str] = []
    for path in paths:
        status: list[str] = []

        def start_response(
            code: str, headers: list[tuple[str, str]], exc_info: Any = None, _s: list[str] = status
        ) -> Callable[[bytes], object]:
            _s.append(code)
            return lambda data: None

        try:
            body = app(_environ(path, host), start_response)
            try:
                for _chunk in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            logger.warning("forksafe.preload.warm_up: GET %s failed: %r", path, exc)
            statuses.append(f"error: {exc!r}")
            continue
        statuses.append(status[-1] if status else "error: the app sent no status")
    return statuses
