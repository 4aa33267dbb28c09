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

Stale connections (``track(engine, idle_check=..., recycle=...)``):

* a ``checkin`` listener stamps the record with ``time.monotonic()``; the ``checkout``
  listener compares it with one threshold, so a hot connection pays one subtraction and
  one comparison, never a round trip (``pool_pre_ping`` pays a round trip every time);
* a connection idle for at least ``idle_check`` seconds is pinged first (the dialect's
  ``do_ping``); a dead one is replaced, and every connection older than it is dropped too
  (``InvalidatePoolError``: a dead idle connection usually means a restart or a cut);
* with ``recycle="auto"`` the ``connect`` listener asks the server its idle limit once
  per new connection (MySQL/MariaDB ``@@session.wait_timeout``, PostgreSQL
  ``idle_session_timeout``) and a connection idle for 90% of it is replaced without a
  ping: the server is about to drop it. A ``pool_recycle`` set by the user is left as it
  is (SQLAlchemy applies it by age, forksafe by idle time); ``recycle=seconds`` sets the
  idle limit directly;
* a ``handle_error`` listener marks every error `forksafe.errors` classifies as a
  disconnect as one (so SQLAlchemy invalidates the connection and every older one in the
  pool), and logs the explanation once per cause.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from typing import Any

from forksafe import _fork, errors
from forksafe._idle_limit import DEFAULT_IDLE_CHECK, RETIRE_FRACTION, server_idle_limit
from forksafe._registry import REGISTRY, ConnectionEntry
from forksafe.drivers import dialect_drivers, find_driver, supported_names, unwrap
from forksafe.exceptions import UnsupportedObjectError

try:
    from sqlalchemy import event, exc
    from sqlalchemy.engine import Engine
except ImportError as _err:  # pragma: no cover - exercised by users without SQLAlchemy
    raise ImportError(
        "forksafe.sqlalchemy requires the SQLAlchemy package: pip install 'forksafe[sqlalchemy]'"
    ) from _err

__all__ = [
    "DEFAULT_IDLE_CHECK",
    "SUPPORTED_DIALECT_DRIVERS",
    "EngineAdapter",
    "as_sync_engine",
    "is_engine",
    "server_idle_limit",
]

logger = logging.getLogger("forksafe")

# Keys in ``_ConnectionRecord.info`` (SQLAlchemy clears it when it reconnects a record).
_IDLE_SINCE = "forksafe_idle_since"
_RETIRE_AFTER = "forksafe_retire_after"

#: ``engine.dialect.driver`` values whose connections forksafe can neutralise.
SUPPORTED_DIALECT_DRIVERS = dialect_drivers()


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

    def __init__(
        self,
        engine: Engine,
        *,
        idle_check: float | None = DEFAULT_IDLE_CHECK,
        recycle: float | str | None = "auto",
    ) -> None:
        if idle_check is not None and not idle_check >= 0:
            raise ValueError(f"idle_check must be seconds >= 0 or None, got {idle_check!r}")
        if not (recycle is None or recycle == "auto" or (
            isinstance(recycle, (int, float)) and not isinstance(recycle, bool) and recycle > 0
        )):
            raise ValueError(f"recycle must be 'auto', seconds > 0 or None, got {recycle!r}")
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
        self._dialect = engine.dialect
        self.idle_check = idle_check
        # "auto" learns the server's limit on connect. It never touches the pool's own
        # ``pool_recycle`` (an age limit the user chose): the two work side by side.
        self._learn_limit = recycle == "auto"
        self.retire_after: float | None = (
            float(recycle) if isinstance(recycle, (int, float)) else None
        )
        # The one number the hot path compares with: the smallest idle time that needs any
        # action. Lowered (never raised) as connections report their server's limit; a
        # plain float write, atomic under the GIL, so checkouts read it without a lock.
        self._check_after = math.inf
        self._update_threshold(None)

    def _update_threshold(self, learned: float | None) -> None:
        candidates = [t for t in (self.idle_check, self.retire_after, learned) if t is not None]
        if candidates:
            self._check_after = min(self._check_after, *candidates)

    # -- hooks -----------------------------------------------------------------------------
    def attach(self) -> None:
        """Install the listeners and record the connections the pool already has."""
        engine = self._engine()
        if engine is None:
            return
        self._listen(engine, "connect", self._on_connect)
        self._listen(engine, "checkout", self._on_checkout)
        if self.idle_check is not None or self.retire_after is not None or self._learn_limit:
            self._listen(engine, "checkin", self._on_checkin_idle)
        self._listen(engine, "handle_error", self._on_error)
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
                owner=self,
            ),
        )

    def _on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        self._register(dbapi_connection)
        if self._learn_limit:
            try:
                limit = server_idle_limit(self._dialect.name, dbapi_connection)
            except Exception as err:  # never fail a connect over an optimisation
                logger.debug("forksafe: %s: could not read the server's idle limit: %r",
                             self._origin, err)
                return
            if limit is not None:
                retire = limit * RETIRE_FRACTION
                if self.retire_after is not None:
                    retire = min(retire, self.retire_after)
                connection_record.info[_RETIRE_AFTER] = retire
                self._update_threshold(retire)

    def _on_checkin_idle(self, dbapi_connection: Any, connection_record: Any) -> None:
        if connection_record is not None:
            connection_record.info[_IDLE_SINCE] = time.monotonic()

    def _on_error(self, context: Any) -> None:
        # SQLAlchemy's error carries the statement: its size tells a packet too large
        original = context.sqlalchemy_exception or context.original_exception
        kind = errors.classify(original)
        if kind is None:
            return
        if kind.disconnect and not context.is_disconnect:
            context.is_disconnect = True
        errors.report(original, self._origin)

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
        # The hot path of a pooled connection: one dict lookup, one clock read, one compare.
        since = connection_record.info.get(_IDLE_SINCE)
        if since is not None and time.monotonic() - since >= self._check_after:
            self._check_idle(dbapi_connection, connection_record, since)

    def _check_idle(self, dbapi_connection: Any, record: Any, since: float) -> None:
        """A connection idle long enough that it may be dead: retire it, or ping it."""
        idle = time.monotonic() - since
        retire = record.info.get(_RETIRE_AFTER, self.retire_after)
        if retire is not None and idle >= retire:
            raise exc.DisconnectionError(
                f"forksafe: connection idle {idle:.1f}s, past {retire:.1f}s (90% of the "
                "server's idle limit, or recycle=); replacing it without a round trip"
            )
        if self.idle_check is None or idle < self.idle_check:
            return
        try:
            self._dialect.do_ping(dbapi_connection)
        except Exception as err:
            errors.report(err, self._origin)
            raise exc.InvalidatePoolError(
                f"forksafe: connection idle {idle:.1f}s failed its liveness check ({err!r}); "
                "replacing it and every older pooled connection"
            ) from err
        record.info[_IDLE_SINCE] = time.monotonic()

    # -- fork ------------------------------------------------------------------------------
    def reset_in_child(self) -> None:
        """Give the engine a fresh pool of the same configuration, closing nothing."""
        engine = self._engine()
        if engine is not None:
            engine.dispose(close=False)
