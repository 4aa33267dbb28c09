"""A psycopg_pool ``ConnectionPool`` opened in the parent, used and closed in a child.

``--mode none`` is the control: the child takes the parent's pooled connection and its
``pool.close()`` ends it. ``--mode protect``: ``forksafe.instrument()`` (the pool's
connections are tracked as the driver makes them) and ``forksafe.register_after_fork()``
with a callback that gives the child a pool of its own. Prints one JSON object: the
parent's backend pid before and after the fork (or its error), the child's, and both
processes' internal errors.
"""

from __future__ import annotations

import argparse

from _child import finish, in_child

import forksafe

parser = argparse.ArgumentParser()
parser.add_argument("--conninfo", required=True)
parser.add_argument("--mode", choices=["none", "protect"], required=True)
args = parser.parse_args()
if args.mode == "protect":
    forksafe.instrument()

from psycopg_pool import ConnectionPool  # noqa: E402


def new_pool() -> ConnectionPool:
    pool = ConnectionPool(args.conninfo, min_size=1, max_size=1, open=True,
                          kwargs={"autocommit": True})
    pool.wait(timeout=60)
    return pool


POOL = new_pool()

if args.mode == "protect":

    @forksafe.register_after_fork
    def child_pool() -> None:
        global POOL  # noqa: PLW0603 - the app's own global, as an app would have it
        POOL = new_pool()  # the parent's pool (its connections neutralised) is dropped


def backend_pid() -> int:
    with POOL.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def worker(child: dict) -> None:
    child["pid"] = backend_pid()
    POOL.close(timeout=5)


report: dict = {"before_pid": backend_pid()}
report["child"], _ = in_child(worker)
try:
    report["after_pid"] = backend_pid()
except Exception as exc:
    report["error"] = repr(exc)
finish(report)
