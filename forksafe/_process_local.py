"""`ProcessLocal`: one lazily created object (a raw DBAPI connection) per process.

The classic mistake is a module-level ``db = MySQLdb.connect(...)`` that a pre-forking
server then shares between all its workers. ``db = ProcessLocal(lambda: MySQLdb.connect(...))``
keeps the one-liner but opens the connection on first use *in each process*; the copy a
child inherits is neutralised by forksafe's fork reset (it is tracked), never used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from forksafe import _fork

__all__ = ["ProcessLocal"]

T = TypeVar("T")


class ProcessLocal(Generic[T]):
    """A per-process (optionally per-thread) object created lazily by ``factory``.

    Args:
        factory: called with no arguments to create the object, at most once per process
            (per thread with ``per_thread=True``).
        track: pass the new object to `forksafe.track` (default True), so that a child's
            inherited copy is neutralised at fork.
        per_thread: one object per thread instead of per process. DBAPI connections are not
            safe to share between threads; use this under threaded workers.

    Example::

        db = forksafe.ProcessLocal(lambda: MySQLdb.connect(host="db", user="app"))

        def view(request):
            cur = db.get().cursor()
    """

    def __init__(
        self, factory: Callable[[], T], *, track: bool = True, per_thread: bool = False
    ) -> None:
        if not callable(factory):
            raise TypeError(
                f"ProcessLocal needs a factory to call, got {type(factory).__name__}: "
                "pass a function, e.g. ProcessLocal(lambda: MySQLdb.connect(...))"
            )
        self._factory = factory
        self._track = track
        self._per_thread = per_thread
        self._pid = -1
        self._obj: T | None = None
        self._local = threading.local()
        # One creation lock per pid. A lock object is never shared across a fork in the
        # locked state: a child that finds no lock for its pid makes its own, and
        # dict.setdefault is atomic under the GIL, so two threads agree on one lock.
        self._locks: dict[int, threading.Lock] = {}

    def get(self) -> T:
        """Return this process's (thread's) object, creating it on first use."""
        pid = os.getpid()
        if self._per_thread:
            slot = getattr(self._local, "slot", None)
            if slot is not None and slot[0] == pid:
                obj: T = slot[1]
                return obj
            obj = self._create(pid)
            self._local.slot = (pid, obj)
            return obj
        current = self._obj
        if current is not None and self._pid == pid:
            return current
        lock = self._locks.setdefault(pid, threading.Lock())
        with lock:
            if self._obj is None or self._pid != pid:
                self._obj = self._create(pid)
                self._pid = pid
            for other in [p for p in self._locks if p != pid]:
                self._locks.pop(other, None)
            return self._obj

    __call__ = get

    def _create(self, pid: int) -> T:
        if pid != _fork.current_pid():
            _fork.after_fork()  # a fork no hook saw: neutralise what was inherited first
        obj = self._factory()
        if self._track:
            from forksafe import track

            track(obj)
        return obj

    def close(self) -> None:
        """Close this process's object (if it has one and it has ``close``) and forget it.

        Never closes an object inherited from another process.
        """
        pid = os.getpid()
        if self._per_thread:
            slot = getattr(self._local, "slot", None)
            self._local.slot = None
            obj = slot[1] if slot is not None and slot[0] == pid else None
        else:
            obj = self._obj if self._pid == pid else None
            self._obj, self._pid = None, -1
        closer = getattr(obj, "close", None)
        if callable(closer):
            closer()
