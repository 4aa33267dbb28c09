"""An application's own at-fork hook, registered before ``import forksafe``, disposes of
the engine in the child.

``os.register_at_fork`` runs ``after_in_child`` hooks in the order they were registered, so
this one runs before forksafe's: in the child, the tracked engine's pool still holds the
parent's connections when ``engine.dispose()`` closes them. ``--mode none`` is the control
(nothing tracked). The child does nothing else and leaves with ``os._exit(0)``. Prints one
JSON object: the parent's session id before and after the fork, its error if any, and
both processes' internal errors.
"""

from __future__ import annotations

import argparse
import os

ENGINE = None


def dispose_in_child() -> None:
    if ENGINE is not None:
        ENGINE.dispose()


os.register_at_fork(after_in_child=dispose_in_child)

from _child import finish, in_child  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

import forksafe  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
parser.add_argument("--mode", choices=["none", "track"], required=True)
args = parser.parse_args()

ENGINE = create_engine(args.url)
if args.mode == "track":
    forksafe.track(ENGINE)
report: dict = {}
with ENGINE.connect() as conn:
    report["before_id"] = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
child, report["child_status"] = in_child(lambda child: None)  # the child does nothing
report["child_internal_errors"] = child.get("internal_errors")
try:
    with ENGINE.connect() as conn:
        report["after_id"] = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
except Exception as exc:
    report["error"] = repr(exc)
finish(report)
