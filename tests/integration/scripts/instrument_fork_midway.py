"""A fork that lands while instrument() is recording a connection another thread just made.

A worker thread connects with mysqlclient under ``forksafe.instrument()``; forksafe's
recording of that connection is paused (the one seam this script patches: the call that
notes the connection's creation site) until the main thread has forked. The child reports
what forksafe logged and what it knows of the connection; nothing in it is timed, every
step waits for a signal. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import threading

import MySQLdb
from _child import forksafe_log, in_child, mysql_session_id

import forksafe
from forksafe import _instrument

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()

WAIT = 60.0
recorded = threading.Event()
forked = threading.Event()
done = threading.Event()
report: dict = {}


lines = forksafe_log()
forksafe.instrument()
real_record = _instrument._record


def record_then_wait(obj: object, kind: str) -> object:
    origin = real_record(obj, kind)
    if threading.current_thread().name == "worker":
        recorded.set()
        forked.wait(WAIT)
    return origin


_instrument._record = record_then_wait


def worker() -> None:
    try:
        conn = MySQLdb.connect(host="127.0.0.1", port=args.port, user="root")
        report["session"] = mysql_session_id(conn)
        report["tracked_in_parent"] = [c.tracked for c in forksafe.connections()
                                       if c.kind == "connection"]
    except Exception as exc:
        report["error"] = repr(exc)
    done.set()


thread = threading.Thread(target=worker, name="worker", daemon=True)
thread.start()
if not recorded.wait(WAIT):
    raise SystemExit("the worker never connected")


def in_the_child(child: dict) -> None:
    child["log"] = lines
    child["tracked"] = [c.tracked for c in forksafe.connections() if c.kind == "connection"]


report["child"], _ = in_child(in_the_child)
forked.set()
if not done.wait(WAIT):
    report["error"] = "the worker never finished"
print(json.dumps(report), flush=True)
