"""The SQLAlchemy adapter: what `forksafe.track` does with an ``Engine``.

On ``track(engine)``:

* a pool ``connect`` listener records every DBAPI connection the engine opens, with the pid
  that opened it (SQLAlchemy carries pool listeners over to the pool that
  ``engine.dispose()`` creates, so the listeners live as long as the engine);
* a pool ``checkout`` listener compares ``os.getpid()`` with the pid forksafe last reset for
  (about 1 µs). A mismatch means a fork no hook saw: it resets the process, then raises
  ``DisconnectionError`` so the pool drops the inherited connection and opens a new one;
* connections the pool already holds are recorded too; connections checked out at the time
  of ``track()`` are recorded when they come back.

In a child, `EngineAdapter.reset_in_child` runs after every inherited socket was neutralised
and gives the engine a fresh pool of the same configuration (``dispose(close=False)``):
nothing of the old pool can reach the server any more, whatever the child does with it.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

from forksafe import _fork
from forksafe._registry import REGISTRY, ConnectionEntry
from forksafe.drivers import find_driver, supported_names, unwrap
from forksafe.exceptions import UnsupportedObjectError

try:
    from sqlalchemy import event, exc
    from sqlalchemy.engine import Engine
except ImportError as _err:  # pragma: no cover - exercised by users without SQLAlchemy
    raise ImportError(
        "forksafe.sqlalchemy requires the SQLAlchemy package: pip install 'forksafe[sqlalchemy]'"
    ) from _err

__all__ = ["SUPPORTED_DIALECT_DRIVERS", "EngineAdapter", "as_sync_engine", "is_engine"]

#: ``engine.dialect.driver`` values whose connections forksafe can neutralise.
SUPPORTED_DIALECT_DRIVERS = frozenset(
    {"mysqldb", "pymysql", "psycopg2", "psycopg", "psycopg_async"}
)


def is_engine(obj: object) -> bool:
    """Whether ``obj`` is a SQLAlchemy ``Engine`` or ``AsyncEngine``."""
    return isinstance(obj, Engine) or isinstance(getattr(obj, "sync_engine", None), Engine)


def as_sync_engine(obj: Any) -> Engine:
    """The sync ``Engine`` behind an ``AsyncEngine`` (or the engine itself)."""
    sync = getattr(obj, "sync_engine", None)
    return sync if isinstance(sync, Engine) else obj


def describe(engine: Engine) -> str:
    """A password-free description of an engine, for logs and errors."""
    return f"Engine({engine.url.render_as_string(hide_password=True)})"


def _idle_records(pool: Any) -> list[Any]:
    """The connection records a pool holds right now (QueuePool, SingletonThreadPool, ...)."""
    queue = getattr(getattr(pool, "_pool", None), "queue", None)
    if queue is not None:
        return list(queue)
    records = getattr(pool, "_all_conns", None)
    if records is not None:
        return list(records)
    single = getattr(pool, "connection", None)  # StaticPool
    return [single] if single is not None else []


def _record_connection(record: Any) -> Any:
    return getattr(record, "dbapi_connection", None) or getattr(record, "connection", None)


class EngineAdapter:
    """Installs forksafe's pool listeners on one engine and resets it in a child."""

    def __init__(self, engine: Engine) -> None:
        driver = engine.dialect.driver
        if driver not in SUPPORTED_DIALECT_DRIVERS:
            raise UnsupportedObjectError(
                f"forksafe cannot protect {describe(engine)}: its driver {driver!r} is not "
                f"supported. Supported drivers: {supported_names()} "
                "(SQLAlchemy URLs mysql+mysqldb, mysql+pymysql, postgresql+psycopg2, "
                "postgresql+psycopg)."
            )
        self._engine_ref = weakref.ref(engine)
        self._origin = describe(engine)
        self._listeners: list[tuple[str, Any]] = []

    # -- hooks -----------------------------------------------------------------------------
    def attach(self) -> None:
        """Install the listeners and record the connections the pool already has."""
        engine = self._engine()
        if engine is None:
            return
        self._listen(engine, "connect", self._on_connect)
        self._listen(engine, "checkout", self._on_checkout)
        for record in _idle_records(engine.pool):
            conn = _record_connection(record)
            if conn is not None:
                self._register(conn)
        checked_out = getattr(engine.pool, "checkedout", lambda: 0)()
        if checked_out:
            self._listen(engine, "checkin", self._on_checkin)

    def detach(self) -> None:
        """Remove every listener `attach` installed."""
        engine = self._engine()
        listeners, self._listeners = self._listeners, []
        if engine is None:
            return
        for name, fn in listeners:
            if event.contains(engine, name, fn):
                event.remove(engine, name, fn)

    def _listen(self, engine: Engine, name: str, fn: Any) -> None:
        event.listen(engine, name, fn)
        self._listeners.append((name, fn))

    def _engine(self) -> Engine | None:
        return self._engine_ref()

    def _register(self, dbapi_connection: Any) -> None:
        conn = unwrap(dbapi_connection)
        driver = find_driver(conn)
        if driver is None:
            return
        REGISTRY.add_connection(
            conn,
            ConnectionEntry(
                driver=driver,
                pid=os.getpid(),
                origin=self._origin,
                created_at=time.monotonic(),
                owner=self,
            ),
        )

    def _on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        self._register(dbapi_connection)

    def _on_checkin(self, dbapi_connection: Any, connection_record: Any) -> None:
        if dbapi_connection is not None:
            self._register(dbapi_connection)

    def _on_checkout(self, dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        if os.getpid() != _fork.current_pid():
            # A fork that no hook saw: reset now, then make the pool replace this
            # inherited connection (its socket is neutralised by the reset).
            _fork.after_fork()
            raise exc.DisconnectionError(
                "forksafe: this connection was inherited across a fork; opening a new one"
            )

    # -- fork ------------------------------------------------------------------------------
    def reset_in_child(self) -> None:
        """Give the engine a fresh pool of the same configuration, closing nothing."""
        engine = self._engine()
        if engine is not None:
            engine.dispose(close=False)
