"""The WSGI app every ``forksafe repro`` scenario serves: a database used at import time.

Configured by environment (names in `forksafe.testing.checks`):

* ``FORKSAFE_REPRO_URL``: SQLAlchemy URL, driver included (``mysql+mysqldb://``,
  ``mysql+pymysql://``, ``postgresql+psycopg2://``).
* ``FORKSAFE_REPRO_MODE``: ``engine`` (a SQLAlchemy engine) or ``raw`` (one global DBAPI
  connection, the classic mistake).
* ``FORKSAFE_REPRO_PROTECT``: ``1`` for the app as forksafe's docs say to write it, ``0``
  for the same app without forksafe.
* ``FORKSAFE_REPRO_DB_TIMEOUT``: the driver's read/write timeout in seconds (MySQL drivers),
  so that a worker stuck on a shared socket fails with 2013 instead of hanging for ever.
* ``FORKSAFE_REPRO_POOL`` (engine mode): ``queue`` (default, a ``QueuePool``), ``null``
  (``NullPool``) or ``pre_ping`` (``pool_pre_ping=True``), for the benchmarks in bench/.

Importing this module **creates and uses** the database object, like an app that checks its
database, warms a cache or reflects tables while it loads. uWSGI without ``lazy-apps`` and
gunicorn with ``preload_app`` import the app in the master and fork afterwards: without
forksafe every worker inherits that open connection.

Protection, as a user would write it:

* engine mode: ``engine = forksafe.track(create_engine(url))``;
* raw mode: ``db = forksafe.ProcessLocal(connect, per_thread=True)``: one connection per
  process (and per thread, for threaded workers), opened on first use; the copy a worker
  inherits is tracked, so forksafe neutralises it at fork. ``ProcessLocal`` rather than
  ``forksafe.track(conn)`` because a tracked raw connection is only made *harmless* in the
  child (it fails at once with "not connected"); something must open the child's own.

The unprotected raw mode serialises the threads of one process on a lock, so that what goes
wrong there comes from sharing across processes, not from threads sharing a connection.

Requests: ``GET /?n=<unique number>`` answers ``{"echo": n, "rows": [...], "pid": ...}``
(see `forksafe.testing.checks.expected_answer`); a failure answers 500 with
``{"error": <category>, "message": ...}``. ``GET /health`` touches no database.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from forksafe.testing import checks

__all__ = ["DB", "Database", "answer", "application", "connect_raw", "open_database"]

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

# checks.TABLE is a constant, never input
_ROWS_SQL = f"SELECT id, label FROM {checks.TABLE} WHERE id BETWEEN %s AND %s ORDER BY id"  # noqa: S608


def connect_raw(url_string: str, timeout: int = 3) -> Any:
    """A raw DBAPI connection (autocommit on) to the database of a SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    url = make_url(url_string)
    driver = url.get_driver_name()
    if url.get_backend_name() == "postgresql":
        import psycopg2

        pg = psycopg2.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password or "",
            dbname=url.database or "postgres",
            connect_timeout=timeout,
        )
        pg.autocommit = True
        return pg
    kwargs: dict[str, Any] = {
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "database": url.database or "",
        **checks.driver_timeout_args(url.drivername, timeout),
    }
    if url.password:
        kwargs["password"] = url.password
    if driver == "pymysql":
        import pymysql

        return pymysql.connect(**kwargs, autocommit=True)
    import MySQLdb

    return MySQLdb.connect(**kwargs, autocommit=True)


def _raw_answer(conn: Any, n: int) -> dict[str, Any]:
    a = checks.first_id_for(n)
    cur = conn.cursor()
    try:
        cur.execute("SELECT %s AS echo", (n,))
        names = [d[0] for d in cur.description or ()]
        first = cur.fetchall()
        echo = dict(zip(names, first[0], strict=False))["echo"] if first else None
        cur.execute(_ROWS_SQL, (a, a + checks.ROWS_PER_REQUEST - 1))
        names = [d[0] for d in cur.description or ()]
        rows = [dict(zip(names, r, strict=False)) for r in cur.fetchall()]
        return {"echo": echo, "rows": [[r["id"], r["label"]] for r in rows]}
    finally:
        cur.close()


class Database:
    """The app's database object: an engine or a raw connection, protected or not."""

    def __init__(
        self, url: str, mode: str, protect: bool, timeout: int, pool: str = "queue"
    ) -> None:
        if mode not in checks.MODES:
            raise ValueError(f"{checks.ENV_MODE} must be one of {checks.MODES}, not {mode!r}")
        if pool not in checks.POOLS:
            raise ValueError(f"{checks.ENV_POOL} must be one of {checks.POOLS}, not {pool!r}")
        self.mode = mode
        self.protect = protect
        self._lock = threading.Lock()
        self.engine: Any = None
        self.raw: Any = None
        self.local: Any = None
        if protect:
            import forksafe
        if mode == "engine":
            from sqlalchemy import create_engine
            from sqlalchemy.engine import make_url

            connect_args = checks.driver_timeout_args(make_url(url).drivername, timeout)
            if pool == "null":
                from sqlalchemy.pool import NullPool

                engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
            else:
                engine = create_engine(
                    url, pool_size=8, connect_args=connect_args, pool_pre_ping=pool == "pre_ping"
                )
            self.engine = forksafe.track(engine) if protect else engine
        elif protect:
            self.local = forksafe.ProcessLocal(lambda: connect_raw(url, timeout), per_thread=True)
        else:
            self.raw = connect_raw(url, timeout)

    def answer(self, n: int) -> dict[str, Any]:
        """Run request ``n``'s two queries on one connection and return what came back."""
        if self.engine is not None:
            from sqlalchemy import text

            a = checks.first_id_for(n)
            with self.engine.connect() as conn:
                first = conn.execute(text("SELECT :n AS echo"), {"n": n}).mappings().all()
                echo = first[0]["echo"] if first else None
                result = conn.execute(
                    text(_ROWS_SQL % (":a", ":b")),
                    {"a": a, "b": a + checks.ROWS_PER_REQUEST - 1},
                )
                rows = [[r["id"], r["label"]] for r in result.mappings().all()]
            return {"echo": echo, "rows": rows}
        if self.local is not None:
            return _raw_answer(self.local.get(), n)
        with self._lock:  # threads of one process never share the connection at once
            return _raw_answer(self.raw, n)


def open_database() -> Database:
    """Build the `Database` from the environment, and use it once (as apps do at import)."""
    url = os.environ.get(checks.ENV_URL)
    if not url:
        raise RuntimeError(f"{checks.ENV_URL} is not set: run this app through forksafe repro")
    database = Database(
        url,
        mode=os.environ.get(checks.ENV_MODE, "engine"),
        protect=os.environ.get(checks.ENV_PROTECT, "1") == "1",
        timeout=int(os.environ.get(checks.ENV_DB_TIMEOUT, "3")),
        pool=os.environ.get(checks.ENV_POOL, "queue"),
    )
    database.answer(0)  # the connection is open, and idle in the pool, before the fork
    return database


DB = open_database()


def answer(n: int) -> dict[str, Any]:
    """Request ``n``'s answer, or ``{"error": category, "message": ...}`` on failure."""
    try:
        body = DB.answer(n)
    except Exception as exc:
        return {"error": checks.classify_exception(exc), "message": str(exc)[:300]}
    body["pid"] = os.getpid()
    return body


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point."""
    if environ.get("PATH_INFO") == "/health":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        n = int(query["n"][0])
    except (KeyError, ValueError):
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"GET /?n=<integer>\n"]
    body = answer(n)
    status = "500 Internal Server Error" if "error" in body else "200 OK"
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    start_response(status, headers)
    return [data]
