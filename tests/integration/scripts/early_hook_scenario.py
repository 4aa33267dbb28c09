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
import json
import os

ENGINE = None


def dispose_in_child() -> None:
    if ENGINE is not None:
        ENGINE.dispose()


os.register_at_fork(after_in_child=dispose_in_child)

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
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    os.write(write_end, json.dumps([repr(e) for e in forksafe.internal_errors()]).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    report["child_internal_errors"] = json.loads(pipe.read() or b"null")
_, report["child_status"] = os.waitpid(pid, 0)
try:
    with ENGINE.connect() as conn:
        report["after_id"] = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
except Exception as exc:
    report["error"] = repr(exc)
report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
print(json.dumps(report), flush=True)
os._exit(0)  # the parent never says goodbye: a Quit in the server's log came from the child
