"""A tracked connection whose socket is gone, and a descriptor number reused since.

The parent tracks a raw mysqlclient connection; its session is killed on the server; a
query fails (2013) and libmysqlclient closes the socket, while the object still reports
``open`` and its old ``fileno()``. The parent then opens ``multiprocessing.Pipe()``, which
takes that number, and starts a fork ``Process`` that sends on it: the parent must receive
the message. ``--mode control`` does not track the connection and instead makes the child
replace the descriptor *by number*, as forksafe did before it checked a socket's identity:
the child's send then fails. Prints one JSON object (``received`` carries the child's own
``forksafe`` log records).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os

import MySQLdb

import forksafe
from forksafe import _sockets

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--mode", choices=["safe", "control"], required=True)
args = parser.parse_args()

WAIT = 60.0
records: list[str] = []


class Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        records.append(record.getMessage())


logging.getLogger("forksafe").addHandler(Keep())
logging.getLogger("forksafe").setLevel(logging.DEBUG)

kwargs = {"host": "127.0.0.1", "port": args.port, "user": "root", "autocommit": True}
conn = MySQLdb.connect(**kwargs)
if args.mode == "safe":
    forksafe.track(conn)
cur = conn.cursor()
cur.execute("SELECT CONNECTION_ID()")
(cid,) = cur.fetchone()
admin = MySQLdb.connect(**kwargs)
admin.cursor().execute(f"KILL {int(cid)}")
admin.close()
report: dict = {}
try:
    cur.execute("SELECT 1")
except MySQLdb.OperationalError as exc:
    report["query_error"] = exc.args[0]
report["open"] = bool(conn.open)
stale = conn.fileno()
report["stale_fd"] = stale

mine, theirs = multiprocessing.Pipe()
report["pipe_fds"] = [mine.fileno(), theirs.fileno()]
sender = mine if mine.fileno() == stale else theirs  # the end that took the number
receiver = theirs if sender is mine else mine


def child() -> None:
    if args.mode == "control":
        _sockets.neutralise_fd(stale)
    sender.send({"message": "hello from the child", "log": records})


process = multiprocessing.get_context("fork").Process(target=child)
process.start()
sender.close()  # the child's copy is the only one left: its exit ends the wait below


def receive() -> dict | None:
    if not receiver.poll(WAIT):  # a bound, not a timing: a message or EOF comes first
        return None
    try:
        message: dict = receiver.recv()
    except EOFError:  # the child exited without sending (its send failed)
        return None
    return message


report["received"] = receive()
process.join(WAIT)
report["child_exitcode"] = process.exitcode
report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
print(json.dumps(report), flush=True)
os._exit(0)
