"""A WSGI app whose engine is used at import, with user post-fork hooks set up many ways.

Environment: DB_URL, HOOK_DIR (where hooks leave one file per worker), HOOK_SETUP (how the
user's own hook is registered relative to forksafe's). Each user hook writes how many
forksafe resets had happened in its process when it ran: 1 means forksafe's hook ran first,
and the garbage collector's freeze state at that moment (``ufreeze-<pid>``).

``HOOK_SETUP=handlers_before`` / ``handlers_after`` set the app's own ``uwsgi.spooler`` and
``uwsgi.mule_msg_hook`` before / after importing forksafe.uwsgi; ``GET /spool`` then spools a
job and sends a mule message, and the handlers record them as ``spooled-*`` / ``mule-*``
files. ``HOOK_BREAK_FREEZE=1`` makes ``gc.freeze`` raise, as a broken runtime would;
``HOOK_GC_DISABLE=1`` disables the collector first thing, as an app that wants it off does.

Every response says whether ``FROZEN_AT_IMPORT`` (a list created at import, in the master
when preloaded) is frozen in the worker that answers: frozen objects are left out of
``gc.get_objects()``; and whether the collector was enabled at the end of the import
(``gc_at_import``) and is where the request runs (``gc_enabled``).
"""

from __future__ import annotations

import gc
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


def record_freeze(tag: str) -> None:
    """Write this process's freeze state as JSON under ``<tag>-<pid>``."""
    from forksafe import _gc_freeze

    final = os.path.join(HOOK_DIR, f"{tag}-{os.getpid()}")
    partial = os.path.join(HOOK_DIR, f".partial-{tag}-{os.getpid()}")
    state = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "freezes": _gc_freeze.freezes(),
        "frozen": gc.get_freeze_count(),
        "enabled": gc.isenabled(),
    }
    with open(partial, "w") as fh:
        json.dump(state, fh)
    os.replace(partial, final)


def user_hook(*_args: object) -> None:
    record("user")
    record_freeze("ufreeze")


def app_spooler(env: dict) -> int:
    import uwsgi

    name = env.get(b"name", b"?").decode()
    with open(os.path.join(HOOK_DIR, f"spooled-{name}"), "w") as fh:
        fh.write(str(os.getpid()))
    return int(uwsgi.SPOOL_OK)


def app_mule_msg_hook(message: bytes) -> None:
    with open(os.path.join(HOOK_DIR, f"mule-{message.decode()}"), "w") as fh:
        fh.write(str(os.getpid()))


if os.environ.get("HOOK_GC_DISABLE") == "1":  # the app's own choice, before forksafe
    gc.disable()

if os.environ.get("HOOK_BREAK_FREEZE") == "1":

    def _broken_freeze() -> None:
        raise RuntimeError("gc.freeze is broken on purpose")

    gc.freeze = _broken_freeze

FROZEN_AT_IMPORT: list[str] = ["created at import"]

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
    elif SETUP == "handlers_before":
        uwsgi.spooler = app_spooler
        uwsgi.mule_msg_hook = app_mule_msg_hook
        import forksafe.uwsgi
    elif SETUP == "handlers_after":
        import forksafe.uwsgi

        uwsgi.spooler = app_spooler
        uwsgi.mule_msg_hook = app_mule_msg_hook
    else:
        raise RuntimeError(f"unknown HOOK_SETUP {SETUP}")

import forksafe  # noqa: E402 - after the hook setup on purpose

engine = forksafe.track(create_engine(os.environ["DB_URL"], pool_size=2))
with engine.connect() as _conn:
    PARENT_ID = int(_conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())

GC_AT_IMPORT = gc.isenabled()  # at the end of the import: in the master, when preloaded


def application(environ: dict, start_response: object) -> list[bytes]:
    from forksafe import _fork

    if environ.get("PATH_INFO") == "/spool":
        import uwsgi

        name = environ.get("QUERY_STRING", "job")
        uwsgi.spool({b"name": name.encode()})
        uwsgi.mule_msg(name.encode(), 1)
        start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
        return [b"spooled"]

    with engine.connect() as conn:
        cid = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
    body = json.dumps(
        {
            "pid": os.getpid(),
            "resets": _fork._STATE.resets,
            "cid": cid,
            "parent_cid": PARENT_ID,
            "internal_errors": [repr(e) for e in forksafe.internal_errors()],
            "import_objects_frozen": not any(o is FROZEN_AT_IMPORT for o in gc.get_objects()),
            "frozen": gc.get_freeze_count(),
            "gc_at_import": GC_AT_IMPORT,
            "gc_enabled": gc.isenabled(),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])  # type: ignore[operator]
    return [body]
