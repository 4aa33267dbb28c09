"""A Celery app whose engine is used while the worker loads, before its prefork pool forks.

The broker and the result backend are files (``CELERY_DATA``): no broker server. The
engine reads ``DATABASE_URL``; ``FORKSAFE=1`` tracks it. ``PARENT_ID`` is the session the
worker's main process opened at import; the ``session`` task answers the pool process's
pid, that id and the session its own query ran on.
"""

from __future__ import annotations

import os

from celery_files import make_app
from sqlalchemy import create_engine, text

app = make_app("celery_app")
engine = create_engine(os.environ["DATABASE_URL"])
if os.environ.get("FORKSAFE") == "1":
    import forksafe

    forksafe.track(engine)
SESSION_ID = text("SELECT CONNECTION_ID()")
with engine.connect() as conn:  # used while the worker loads, before the pool forks
    PARENT_ID = conn.execute(SESSION_ID).scalar()


@app.task
def session() -> list[int]:
    with engine.connect() as conn:
        return [os.getpid(), int(PARENT_ID or 0), int(conn.execute(SESSION_ID).scalar() or 0)]
