"""The weak registry of everything forksafe protects.

Two kinds of entries:

* DBAPI connections (raw ones the user tracked, and every connection a tracked engine's pool
  opened), each with the pid of the process that opened it. After a fork these are the
  inherited sockets to neutralise.
* Engines (anything with a ``reset_in_child()`` tracker), whose pools must start fresh.

Everything is held weakly: tracking never keeps a connection or an engine alive.

Concurrency invariant: every read or write of the two maps happens under ``_lock``, and
``snapshot()`` copies them out so that no caller iterates a live ``WeakKeyDictionary`` (a
garbage collection during iteration would otherwise change its size). The lock is the one
piece of state a fork can break:

1. thread A of the parent holds ``_lock`` inside ``add_connection``;
2. thread B calls ``fork()``; the child is a copy with ``_lock`` held, but without thread A;
3. the child's first ``snapshot()`` blocks forever.

So ``os.fork`` (through the at-fork hooks in ``_fork``) takes the lock before the fork and
the child gets a fresh one. Forks no Python hook sees (uWSGI forks in C) cannot be guarded
that way: there ``acquire`` has a timeout, and a child that times out replaces the lock
(the holder cannot exist in the child) and reports `ChildDeadlockedError` in the log.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from forksafe.drivers import Driver

__all__ = ["REGISTRY", "ConnectionEntry", "Registry", "Resettable"]

LOCK_TIMEOUT = 5.0


class Resettable(Protocol):
    """An adapter (one per tracked engine) that knows how to start fresh in a child."""

    def reset_in_child(self) -> None:
        """Give the tracked object a fresh pool in this (child) process."""

    def detach(self) -> None:
        """Remove every hook this adapter installed."""


@dataclass
class ConnectionEntry:
    """What forksafe knows of one DBAPI connection."""

    driver: Driver
    pid: int
    origin: str
    owner: Any = None  # the engine adapter that opened it; None for track(conn)


class Registry:
    """Weak maps of tracked connections and engines, safe to use from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: weakref.WeakKeyDictionary[Any, ConnectionEntry] = (
            weakref.WeakKeyDictionary()
        )
        self._engines: weakref.WeakKeyDictionary[Any, Resettable] = weakref.WeakKeyDictionary()
        self._held_for_fork = False

    # -- locking -------------------------------------------------------------------------
    def _acquire(self) -> None:
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            # Only a child of a fork no hook saw can get here (see the module docstring).
            from forksafe._fork import report_internal_error
            from forksafe.exceptions import ChildDeadlockedError

            report_internal_error(
                ChildDeadlockedError(
                    f"forksafe's registry lock was held across a fork (pid {os.getpid()}); "
                    "replacing it. Import forksafe.uwsgi or call forksafe.after_fork() in "
                    "your server's post-fork hook so the fork is seen."
                )
            )
            self._lock = threading.Lock()
            self._lock.acquire()

    def before_fork(self) -> None:
        """Hold the lock across ``os.fork`` so the child never inherits it mid-update."""
        self._held_for_fork = self._lock.acquire(timeout=LOCK_TIMEOUT)

    def after_fork_in_parent(self) -> None:
        """Release what `before_fork` took."""
        if self._held_for_fork:
            self._held_for_fork = False
            self._lock.release()

    def after_fork_in_child(self) -> None:
        """The child is single-threaded here: a fresh lock is always correct."""
        self._held_for_fork = False
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------
    def add_connection(self, conn: Any, entry: ConnectionEntry) -> None:
        """Track ``conn`` (weakly). A second add keeps the first entry."""
        self._acquire()
        try:
            self._connections.setdefault(conn, entry)
        finally:
            self._lock.release()

    def discard_connection(self, conn: Any) -> bool:
        """Stop tracking ``conn``; return whether it was tracked."""
        self._acquire()
        try:
            return self._connections.pop(conn, None) is not None
        finally:
            self._lock.release()

    def discard_owner(self, owner: Any) -> int:
        """Stop tracking every connection opened by ``owner``; return how many."""
        self._acquire()
        try:
            mine = [c for c, e in list(self._connections.items()) if e.owner is owner]
            for conn in mine:
                self._connections.pop(conn, None)
            return len(mine)
        finally:
            self._lock.release()

    def connection_entry(self, conn: Any) -> ConnectionEntry | None:
        """The entry of ``conn``, if tracked."""
        self._acquire()
        try:
            return self._connections.get(conn)
        finally:
            self._lock.release()

    # -- engines -------------------------------------------------------------------------
    def add_engine(self, engine: Any, adapter: Resettable) -> bool:
        """Track ``engine`` with its adapter; False if it was already tracked."""
        self._acquire()
        try:
            if engine in self._engines:
                return False
            self._engines[engine] = adapter
            return True
        finally:
            self._lock.release()

    def pop_engine(self, engine: Any) -> Resettable | None:
        """Stop tracking ``engine``; return its adapter if it was tracked."""
        self._acquire()
        try:
            return self._engines.pop(engine, None)
        finally:
            self._lock.release()

    def is_engine_tracked(self, engine: Any) -> bool:
        """Whether ``engine`` is tracked."""
        self._acquire()
        try:
            return engine in self._engines
        finally:
            self._lock.release()

    # -- fork ----------------------------------------------------------------------------
    def take_inherited(
        self, pid: int
    ) -> tuple[list[tuple[Any, ConnectionEntry]], list[Resettable]]:
        """Remove and return the connections opened by other processes, and list the engines.

        Called in a child after a fork: the connections returned are the inherited ones.
        """
        self._acquire()
        try:
            inherited = [(c, e) for c, e in list(self._connections.items()) if e.pid != pid]
            for conn, _ in inherited:
                self._connections.pop(conn, None)
            engines = list(self._engines.values())
        finally:
            self._lock.release()
        return inherited, engines

    def snapshot(self) -> tuple[list[tuple[Any, ConnectionEntry]], list[tuple[Any, Resettable]]]:
        """Copies of both maps, for reporting."""
        self._acquire()
        try:
            return list(self._connections.items()), list(self._engines.items())
        finally:
            self._lock.release()


REGISTRY = Registry()
