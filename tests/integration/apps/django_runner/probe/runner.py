"""Django's own runner, recording what the parent holds when it forks the workers.

Before the suite: the parent's session (read from the driver, no query) and the sessions
idle in its pool. After the suite, with RUNNER_PROBE_PARENT=1: one query on the parent's
own connection, to show whether a worker ended it.
"""

import json
import os

from django.db import connection
from django.test.runner import DiscoverRunner


def session_of(raw):
    """The server's id of a driver connection's session, read without a query."""
    if raw is None:
        return None
    if hasattr(raw, "pgconn"):  # psycopg 3
        return raw.info.backend_pid
    return raw.thread_id()  # MySQLdb


def database_of(raw):
    """The database a psycopg connection is connected to (None for MySQLdb)."""
    return raw.info.dbname if hasattr(raw, "pgconn") else None


def report(record):
    with open(os.environ["RUNNER_REPORT"], "a") as out:
        out.write(json.dumps(record) + "\n")


class Runner(DiscoverRunner):
    def run_suite(self, suite, **kwargs):
        pool = getattr(type(connection), "_connection_pools", {}).get(connection.alias)
        parent = connection.connection
        report({
            "role": "parent", "pid": os.getpid(), "session": session_of(parent),
            "pool_idle": [session_of(c) for c in list(getattr(pool, "_pool", ()))],
        })
        result = super().run_suite(suite, **kwargs)
        if parent is not None and os.environ.get("RUNNER_PROBE_PARENT") == "1":
            after = {"role": "parent-after", "pid": os.getpid(), "error": None}
            try:
                with parent.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchall()
            except Exception as exc:
                after["error"] = f"{type(exc).__name__}: {exc}"[:300]
            report(after)
        return result
