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
import logging
import os
import threading

import MySQLdb

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


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


lines = Lines()
logging.getLogger("forksafe").addHandler(lines)
logging.getLogger("forksafe").setLevel(logging.DEBUG)
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
        cur = conn.cursor()
        cur.execute("SELECT CONNECTION_ID()")
        report["session"] = int(cur.fetchone()[0])
        cur.close()
        report["tracked_in_parent"] = [c.tracked for c in forksafe.connections()
                                       if c.kind == "connection"]
    except Exception as exc:
        report["error"] = repr(exc)
    done.set()


thread = threading.Thread(target=worker, name="worker", daemon=True)
thread.start()
if not recorded.wait(WAIT):
    raise SystemExit("the worker never connected")
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    child = {
        "log": lines.lines,
        "tracked": [c.tracked for c in forksafe.connections() if c.kind == "connection"],
        "internal_errors": [repr(e) for e in forksafe.internal_errors()],
    }
    os.write(write_end, json.dumps(child).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    report["child"] = json.loads(pipe.read() or b"{}")
os.waitpid(pid, 0)
forked.set()
if not done.wait(WAIT):
    report["error"] = "the worker never finished"
print(json.dumps(report), flush=True)
