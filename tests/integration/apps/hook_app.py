"""A WSGI app whose engine is used at import, with user post-fork hooks set up many ways.

Environment: DB_URL, HOOK_DIR (where hooks leave one file per worker), HOOK_SETUP (how the
user's own hook is registered relative to forksafe's). Each user hook writes how many
forksafe resets had happened in its process when it ran: 1 means forksafe's hook ran first.
"""

from __future__ import annotations

import json
import os

from sqlalchemy import create_engine, text

SETUP = os.environ.get("HOOK_SETUP", "")
HOOK_DIR = os.environ["HOOK_DIR"]


def record(tag: str) -> None:
    from forksafe import _fork

    # written under a temporary name, then renamed: a reader never sees a half-written file
    final = os.path.join(HOOK_DIR, f"{tag}-{os.getpid()}")
    partial = os.path.join(HOOK_DIR, f".partial-{tag}-{os.getpid()}")
    with open(partial, "w") as fh:
        fh.write(str(_fork._STATE.resets))
    os.replace(partial, final)


def user_hook(*_args: object) -> None:
    record("user")


if SETUP:
    import uwsgi

    if SETUP == "plain":
        import forksafe.uwsgi
    elif SETUP == "before":
        uwsgi.post_fork_hook = user_hook
        import forksafe.uwsgi
    elif SETUP == "decorators_before":
        import uwsgidecorators

        uwsgidecorators.postfork(user_hook)
        import forksafe.uwsgi
    elif SETUP == "decorators_after":
        # the order is the point of this case: forksafe first, uwsgidecorators after
        import forksafe.uwsgi  # noqa: I001
        import uwsgidecorators

        uwsgidecorators.postfork(user_hook)
    elif SETUP == "manual_after":
        import forksafe.uwsgi

        uwsgi.post_fork_hook = user_hook
    else:
        raise RuntimeError(f"unknown HOOK_SETUP {SETUP}")

import forksafe  # noqa: E402 - after the hook setup on purpose

engine = forksafe.track(create_engine(os.environ["DB_URL"], pool_size=2))
with engine.connect() as _conn:
    PARENT_ID = int(_conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())


def application(environ: dict, start_response: object) -> list[bytes]:
    from forksafe import _fork

    with engine.connect() as conn:
        cid = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
    body = json.dumps(
        {
            "pid": os.getpid(),
            "resets": _fork._STATE.resets,
            "cid": cid,
            "parent_cid": PARENT_ID,
            "internal_errors": [repr(e) for e in forksafe.internal_errors()],
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])  # type: ignore[operator]
    return [body]
