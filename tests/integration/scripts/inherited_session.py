"""A scoped ORM session that was left open across the fork (a start-up query without
``remove()``), used in the child.

The child's first statement fails (forksafe neutralised the inherited connection); the
script reports how forksafe explains that error (``errors.classify`` / ``explain`` and its
log), then removes the session and queries again. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import logging

from _child import finish, forksafe_log, in_child
from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session, sessionmaker

import forksafe
from forksafe import errors

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
args = parser.parse_args()


lines = forksafe_log(logging.WARNING)
engine = forksafe.track(create_engine(args.url))
Session = scoped_session(sessionmaker(bind=engine))
SESSION_ID = text("SELECT CONNECTION_ID()")
report: dict = {"before_id": Session.execute(SESSION_ID).scalar()}  # left open on purpose



def worker(child: dict) -> None:
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
    child["log"] = lines


report["child"], _ = in_child(worker)
try:
    report["after_id"] = Session.execute(SESSION_ID).scalar()
except Exception as exc:
    report["error"] = repr(exc)
finish(report)
