"""The weak registry of everything forksafe protects.

Two kinds of entries:

* DBAPI connections (raw ones the user tracked, and every connection a tracked engine's pool
  opened), each with the pid of the process that opened it. After a fork these are the
  inherited sockets to neutralise.
* Engines (anything with a ``reset_in_child()`` tracker), whose pools must start fresh.

Everything is held weakly: tracking never keeps a connection or an engine alive.

Concurrency invariant: every read or write of the two maps happens under ``_lock``, and
``snapshot()`` copies them out so that no caller iterates a live ``WeakKeyDictionary`` (a
garbage collection during iteration would otherwise change its size). ``_lock`` is a
`forksafe._state.ForkLock`: a child never finds it held by a thread that did not survive
the fork. Every update of a map is one operation on a dict, which a fork cannot split, so
the lock is not held across ``os.fork``: nothing another thread does can delay a fork. The
before-fork hook takes strong references to every tracked connection
(`connections_to_hold`), so that none is freed in the child before it is neutralised.

Each connection's entry records the identity of its socket (``st_dev``/``st_ino``) when it
is tracked, so that a child never replaces a descriptor number that has since been reused
for something else (see ``forksafe._fork.neutralise``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from forksafe import _state
from forksafe._sockets import socket_identity
from forksafe._state import LOCK_TIMEOUT, ForkLock, weak_items
from forksafe.drivers import Driver

__all__ = ["LOCK_TIMEOUT", "REGISTRY", "ConnectionEntry", "Registry", "Resettable"]


class Resettable(Protocol):
    """An adapter (one per tracked engine) that knows how to start fresh in a child."""

    def reset_in_child(self) -> None:
        """Give the tracked object a fresh pool in this (child) process."""

    def detach(self) -> None:
        """Remove every hook this adapter installed."""


@dataclass
class ConnectionEntry:
    """What forksafe knows of one DBAPI connection.

    ``fd`` and ``socket`` are the connection's descriptor number and the identity
    (``st_dev``, ``st_ino``) of its socket when it was tracked; `Registry.add_connection`
    fills them in (None: not known, no socket then).
    """

    driver: Driver
    pid: int
    origin: str
    owner: Any = None  # the engine adapter that opened it; None for track(conn)
    socket: tuple[int, int] | None = None
    fd: int | None = None
    #: A weak reference to the SQLAlchemy pool record that holds it, if any: a checked-out
    #: connection's fairy is held across fork too (its finaliser would use the socket).
    record: Any = None


def record_socket(conn: Any, entry: ConnectionEntry) -> None:
    """Fill in ``entry.socket`` from the connection's current descriptor, if it has one."""
    if entry.socket is not None:
        return
    try:
        fd = entry.driver.socket_fd(conn)
    except Exception:  # not knowable now; neutralise reports its own failure
        return
    if fd is not None:
        entry.socket = socket_identity(fd)
        entry.fd = fd if entry.socket is not None else None


class Registry:
    """Weak maps of tracked connections and engines, safe to use from many threads."""

    def __init__(self) -> None:
        self._lock = ForkLock("registry")
        self._connections: weakref.WeakKeyDictionary[Any, ConnectionEntry] = (
            weakref.WeakKeyDictionary()
        )
        self._engines: weakref.WeakKeyDictionary[Any, Resettable] = weakref.WeakKeyDictionary()

    # -- fork ----------------------------------------------------------------------------
    def connections_to_hold(self) -> list[Any]:
        """Strong references to every tracked connection (the before-fork hook's list).

        Takes no lock, so that nothing another thread holds can delay a fork. With each
        connection checked out from a pool goes the pool's wrapper of it (SQLAlchemy's
        ``_ConnectionFairy``): if only another thread's data referenced that wrapper, the
        child would free it before any hook runs and its finaliser would roll back or close
        the connection on the parent's socket.
        """
        held: list[Any] = []
        for conn, entry in weak_items(self._connections):
            held.append(conn)
            record = entry.record() if entry.record is not None else None
            fairy_ref = getattr(record, "fairy_ref", None)
            fairy = fairy_ref() if callable(fairy_ref) else None
            if fairy is not None:
                held.append(fairy)
        return held

    # -- connections ---------------------------------------------------------------------
    def add_connection(self, conn: Any, entry: ConnectionEntry) -> None:
        """Track ``conn`` (weakly). A second add keeps the first entry, but gives it the
        pool record of the second if it had none: ``instrument()`` records a connection
        when the driver makes it, before the pool that opened it does, and without the
        record its checked-out wrapper would not be held across fork."""
        record_socket(conn, entry)
        with self._lock:
            kept = self._connections.setdefault(conn, entry)
            if kept.record is None:
                kept.record = entry.record
        _state.hold_late(conn)  # if a fork is under way and has listed its holds already

    def discard_connection(self, conn: Any) -> bool:
        """Stop tracking ``conn``; return whether it was tracked."""
        with self._lock:
            return self._connections.pop(conn, None) is not None

    def discard_owner(self, owner: Any) -> int:
        """Stop tracking every connection opened by ``owner``; return how many."""
        with self._lock:
            mine = [c for c, e in list(self._connections.items()) if e.owner is owner]
            for conn in mine:
                self._connections.pop(conn, None)
            return len(mine)

    def connection_entry(self, conn: Any) -> ConnectionEntry | None:
        """The entry of ``conn``, if tracked."""
        with self._lock:
            return self._connections.get(conn)

    # -- engines -------------------------------------------------------------------------
    def add_engine(self, engine: Any, adapter: Resettable) -> bool:
        """Track ``engine`` with its adapter; False if it was already tracked."""
        with self._lock:
            if engine in self._engines:
                return False
            self._engines[engine] = adapter
            return True

    def pop_engine(self, engine: Any) -> Resettable | None:
        """Stop tracking ``engine``; return its adapter if it was tracked."""
        with self._lock:
            return self._engines.pop(engine, None)

    def is_engine_tracked(self, engine: Any) -> bool:
        """Whether ``engine`` is tracked."""
        with self._lock:
            return engine in self._engines

    # -- after a fork --------------------------------------------------------------------
    def take_inherited(
        self, pid: int
    ) -> tuple[list[tuple[Any, ConnectionEntry]], list[Resettable]]:
        """Remove and return the connections opened by other processes, and list the engines.

        Called in a child after a fork: the connections returned are the inherited ones.
        """
        with self._lock:
            inherited = [(c, e) for c, e in list(self._connections.items()) if e.pid != pid]
            for conn, _ in inherited:
                self._connections.pop(conn, None)
            engines = list(self._engines.values())
        return inherited, engines

    def snapshot(self) -> tuple[list[tuple[Any, ConnectionEntry]], list[tuple[Any, Resettable]]]:
        """Copies of both maps, for reporting."""
        with self._lock:
            return list(self._connections.items()), list(self._engines.items())


REGISTRY = Registry()
