"""A Flask-SQLAlchemy app that queries while it loads, then forks a worker.

The worker runs a request's worth of ORM work in an app context, then does what a worker
does when it stops (``db.session.remove()``, ``db.engine.dispose()``) and leaves with
``os._exit(0)``. ``--mode``: ``none`` (the control), ``track`` (``forksafe.track(db.engine)``
in an app context) or ``instrument`` (``forksafe.instrument()`` before the app is made, no
track call). Prints one JSON object: the parent's session id before and after the fork (or
its error), the worker's session id, and both processes' internal errors.
"""

from __future__ import annotations

import argparse

from _child import finish, in_child

import forksafe

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
parser.add_argument("--mode", choices=["none", "track", "instrument"], required=True)
args = parser.parse_args()
if args.mode == "instrument":
    forksafe.instrument()

from flask import Flask  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402
from sqlalchemy import text  # noqa: E402

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = args.url
db = SQLAlchemy(app)
SESSION_ID = text("SELECT CONNECTION_ID()")
report: dict = {}
with app.app_context():
    if args.mode == "track":
        forksafe.track(db.engine)
    report["before_id"] = db.session.execute(SESSION_ID).scalar()
    db.session.remove()



def worker(child: dict) -> None:
    with app.app_context():
        child["id"] = db.session.execute(SESSION_ID).scalar()
        db.session.remove()
        db.engine.dispose()


report["child"], _ = in_child(worker)
try:
    with app.app_context():
        report["after_id"] = db.session.execute(SESSION_ID).scalar()
except Exception as exc:
    report["error"] = repr(exc)
finish(report)
