"""What the fork scenario scripts share: a child that reports back, the parent's last word,
the forksafe log kept, and a MySQL session id.

The scripts run as ``python scripts/NAME.py``, so this module imports as ``_child`` there;
tests import it as ``tests.integration.scripts._child``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import forksafe


def in_child(body: Callable[[dict], object]) -> tuple[dict, int]:
    """Fork a child that runs ``body(report)``, adds its internal errors to ``report`` (an
    exception of ``body`` goes in as ``"error"``), sends it back as JSON and leaves with
    ``os._exit(0)``. In the parent: that report and the child's wait status."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            report: dict = {}
            try:
                body(report)
            except Exception as exc:
                report["error"] = repr(exc)
            report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = json.loads(pipe.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    return child, status


def finish(report: dict) -> None:
    """Print ``report`` with this process's internal errors, then leave with ``os._exit(0)``:
    the parent never says goodbye, so a ``Quit`` (or a disconnection) in the server's log
    for its session came from a child."""
    report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    print(json.dumps(report), flush=True)
    os._exit(0)


def forksafe_log(level: int = logging.DEBUG) -> list[str]:
    """The messages the ``forksafe`` logger emits from now on at ``level`` and above (in this
    process and the children it forks)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("forksafe")
    logger.addHandler(Keep())
    logger.setLevel(level)
    return lines


def mysql_session_id(conn: Any) -> int:
    """``CONNECTION_ID()`` of a raw MySQL DBAPI connection."""
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    (cid,) = cur.fetchone()
    cur.close()
    return int(cid)
