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
import json
import os

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


report: dict = {"before_pid": backend_pid()}
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    child: dict = {}
    try:
        child["pid"] = backend_pid()
        POOL.close(timeout=5)
    except Exception as exc:
        child["error"] = repr(exc)
    child["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    os.write(write_end, json.dumps(child).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    report["child"] = json.loads(pipe.read() or b"{}")
os.waitpid(pid, 0)
try:
    report["after_pid"] = backend_pid()
except Exception as exc:
    report["error"] = repr(exc)
report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
print(json.dumps(report), flush=True)
os._exit(0)  # the parent never says goodbye: a disconnection in the log came from the child
