"""What `forksafe.instrument` records: each engine and connection created while it is on,
where (the first stack frame outside forksafe, SQLAlchemy and the drivers) and by which
process; and the detection options (`forksafe.configure`).

Records are weak: they never keep an object alive, except across a fork, where every
recorded object is held until the child has neutralised it (``forksafe._state``).
"""

from __future__ import annotations

import os
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Any

from forksafe import _fork
from forksafe._state import ForkLock, weak_keys

__all__ = ["CONFIG", "LOCK", "SEEN", "Origin", "creation_site", "record"]

#: modules whose frames are not "where the user created it"
SKIP_PREFIXES = ("forksafe", "sqlalchemy", "MySQLdb", "pymysql", "psycopg", "psycopg2",
                  "importlib", "threading", "asyncio", "greenlet", "contextlib")


@dataclass(frozen=True)
class Origin:
    """Where and by whom an engine or connection was created."""

    site: str
    pid: int
    kind: str  # "engine" or a driver name


class _Config:
    __slots__ = ("scan_at_fork", "strict")

    def __init__(self) -> None:
        self.strict = os.environ.get("FORKSAFE_STRICT", "") not in ("", "0", "false", "no")
        self.scan_at_fork = False


CONFIG = _Config()
LOCK = ForkLock("instrument", reentrant=True)
# Weak records of what was created while instrumented: object -> Origin.
SEEN: weakref.WeakKeyDictionary[Any, Origin] = weakref.WeakKeyDictionary()
def creation_site() -> str:
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(SKIP_PREFIXES):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def record(obj: Any, kind: str) -> Origin:
    origin = Origin(creation_site(), os.getpid(), kind)
    with LOCK:
        SEEN[obj] = origin
    return origin


def records_to_hold() -> list[Any]:
    """Everything recorded while instrumented, held strongly across each fork (no lock)."""
    return weak_keys(SEEN)


_fork.register_hold_source(records_to_hold)
