"""``forksafe.track()`` called in the child, on an engine or raw connection the parent
opened and never tracked (a pool initializer, Celery's ``worker_process_init``).

The parent uses the engine (or a raw mysqlclient connection) once, then forks; the child
calls ``forksafe.track()`` on it (``--mode track``; ``none`` is the control), runs a query
through it (engine) and then closes it (``engine.dispose()`` / ``conn.close()``), and
leaves with ``os._exit(0)``. Prints one JSON object: the parent's session id before and
after, the child's, errors, and both processes' internal errors.
"""

from __future__ import annotations

import argparse

import MySQLdb
from _child import finish, in_child, mysql_session_id
from sqlalchemy import create_engine, text

import forksafe

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--kind", choices=["engine", "raw"], required=True)
parser.add_argument("--mode", choices=["none", "track"], required=True)
args = parser.parse_args()


SESSION_ID = text("SELECT CONNECTION_ID()")
engine = create_engine(f"mysql+mysqldb://root@127.0.0.1:{args.port}/")
raw = MySQLdb.connect(host="127.0.0.1", port=args.port, user="root")
report: dict = {}
if args.kind == "engine":
    with engine.connect() as conn:
        report["before_id"] = conn.execute(SESSION_ID).scalar()
else:
    report["before_id"] = mysql_session_id(raw)



def worker(child: dict) -> None:
    if args.kind == "engine":
        if args.mode == "track":
            forksafe.track(engine)
        with engine.connect() as conn:
            child["id"] = conn.execute(SESSION_ID).scalar()
        engine.dispose()
    else:
        if args.mode == "track":
            forksafe.track(raw)
        raw.close()


report["child"], _ = in_child(worker)
try:
    if args.kind == "engine":
        with engine.connect() as conn:
            report["after_id"] = conn.execute(SESSION_ID).scalar()
    else:
        report["after_id"] = mysql_session_id(raw)
except Exception as exc:
    report["error"] = repr(exc)
finish(report)
