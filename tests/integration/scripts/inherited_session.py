"""A scoped ORM session that was left open across the fork (a start-up query without
``remove()``), used in the child.

The child's first statement fails (forksafe neutralised the inherited connection); the
script reports how forksafe explains that error (``errors.classify`` / ``explain`` and its
log), then removes the session and queries again. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session, sessionmaker

import forksafe
from forksafe import errors

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
args = parser.parse_args()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


lines = Lines()
logging.getLogger("forksafe").addHandler(lines)
engine = forksafe.track(create_engine(args.url))
Session = scoped_session(sessionmaker(bind=engine))
SESSION_ID = text("SELECT CONNECTION_ID()")
report: dict = {"before_id": Session.execute(SESSION_ID).scalar()}  # left open on purpose

read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    child: dict = {}
    try:
        child["id"] = Session.execute(SESSION_ID).scalar()
    except Exception as exc:
        kind = errors.classify(exc)
        child["error"] = repr(exc)[:300]
        child["code"] = kind.code if kind is not None else None
        child["explain"] = errors.explain(exc)
    Session.remove()
    try:
        child["after_remove_id"] = Session.execute(SESSION_ID).scalar()
    except Exception as exc:
        child["after_remove_error"] = repr(exc)[:300]
    child["log"] = lines.lines
    child["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    os.write(write_end, json.dumps(child).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    report["child"] = json.loads(pipe.read() or b"{}")
os.waitpid(pid, 0)
try:
    report["after_id"] = Session.execute(SESSION_ID).scalar()
except Exception as exc:
    report["error"] = repr(exc)
print(json.dumps(report), flush=True)
os._exit(0)
