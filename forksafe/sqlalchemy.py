"""The SQLAlchemy adapter: what `forksafe.track` does with an ``Engine``.

No checkout or checkin listener (any checkout listener forces SQLAlchemy's slower checkout
loop, and every event dispatch costs). Instead ``track(engine)`` changes the class of the
engine's pool to a subclass of its own class, made once per pool class, that overrides
three methods:

* ``connect()`` compares this process's pid with the pid the pool was made for. A mismatch
  is a fork no hook saw (or an orphaned pool used after a reset): forksafe resets the
  process and hands the checkout to the engine's *new* pool, so the child never opens a
  session in, nor takes the lock of, the pool it inherited. The pid is read without a
  system call where the kernel allows: ``forksafe._state.fork_mark()`` is a byte of a page
  the kernel zeroes in every child (``MADV_WIPEONFORK``), so while it reads 1 the pid last
  read by ``os.getpid()`` in this process is still its own, however the process was forked
  (uWSGI's C ``fork()`` too). Where the kernel cannot do that, ``os.getpid()`` is asked at
  every checkout;
* ``_do_get()`` (the pool taking a record out of its queue) stamps the record with the time
  of checkout and checks its liveness (below). Nothing in it raises once the base
  ``_do_get`` returned a record: an error there would leak the record's slot;
* ``recreate()`` (used by ``engine.dispose()`` and by the reset in a child) keeps the new
  pool tracked.

``untrack()`` gives the pool its original class back. A ``connect`` listener records every
DBAPI connection the engine opens (with the pid that opened it) and a ``handle_error``
listener marks the errors `forksafe.errors` classifies as disconnects: both are rare
events. On SQLAlchemy 2.x ``handle_error`` is a dialect event, and a dialect with any
listener makes SQLAlchemy look for ``do_execute`` listeners at every statement; so the
engine's dialect, too, gets a subclass of its own class, whose ``_has_events`` is true only
while an exception is being handled or when the application listens for dialect events
itself (see `_dialect_has_events`). Connections checked out at the time of ``track()`` are
recorded when they come back (by a second subclass that adds ``_do_return_conn`` and gives
way to the lean one once all of them are back; ``_PENDING_LOCK`` orders that against an
``untrack()`` in another thread).

In a child, the reset neutralises every inherited socket; the engine's pool, made for
another pid, is replaced by a fresh one of the same configuration (``dispose(close=False)``)
at the child's first checkout, before anything is taken from it. Building pools is the
costly part of a reset with many engines, so only the engines a child uses pay it.

Liveness at checkout, per pooled connection (``track(engine, idle_check=..., recycle=...)``):

* **The socket, every checkout.** One zero-timeout ``poll()`` of the connection's socket
  (its descriptor is found once, when the connection is made). An idle MySQL/MariaDB
  connection has nothing to read, so a readable one was closed by the server (``KILL``, a
  restart, ``wait_timeout``: the server sent an error packet or EOF) and is replaced before
  it is handed out, without a round trip. PostgreSQL may send NOTICE, ParameterStatus or
  NOTIFY to an idle session, and a TLS socket may hold a record that is not a close: for
  those a readable socket is pinged (one round trip, only then) and replaced if dead.
* **Silent failures**: a connection idle for at least ``idle_check`` seconds is pinged
  (the dialect's ``do_ping``); a dead one is replaced, and every connection older than it
  is dropped too (a cut network sends nothing, so nothing is readable).
* **The server's idle limit** (``recycle="auto"``): at the first checkout of each new
  connection (after every ``connect`` listener of the application ran, so a ``wait_timeout``
  the application sets there is the one learned) forksafe asks the server its idle limit
  (MySQL/MariaDB ``@@session.wait_timeout``, PostgreSQL ``idle_session_timeout``) and a
  connection idle for 90% of it is replaced without a ping. ``recycle=seconds`` sets that
  limit directly. A ``pool_recycle`` set by the user is left as it is.

Private SQLAlchemy API this relies on (pinned by tests/integration/test_pool_internals.py,
run on SQLAlchemy 1.4 and 2.x): ``Pool.connect`` (which is only
``_ConnectionFairy._checkout(pool)``: a tracked pool calls that directly), ``Pool._do_get``,
``Pool.recreate``, ``Pool._do_return_conn``, ``Pool._invalidate_time``,
``_ConnectionRecord.starttime``, an instance ``__dict__`` on ``_ConnectionRecord`` (where
forksafe keeps its state, out of the application's ``info``),
``_ConnectionRecord.invalidate``/``_checkin_failed``,
``_ConnectionRecord.dbapi_connection`` (``connection`` on 1.4), ``StaticPool``'s memoized
``connection``; on 2.x ``Dialect._has_events`` (set by SQLAlchemy when a dialect listener
is added, read before dispatching dialect events; ``handle_error`` is dispatched only from
``except`` blocks) and ``supports_statement_cache`` (read from the dialect class's own dict).
"""

from __future__ import annotations

import logging
import math
import os
import select
import ssl
import sys
import sysconfig
import time
import weakref
from typing import Any

from forksafe import _fork, _state, errors
from forksafe._idle_limit import (
    DEFAULT_IDLE_CHECK,
    PG_IN_TRANSACTION,
    RETIRE_FRACTION,
    pg_transaction_status,
    server_idle_limit,
)
from forksafe._registry import REGISTRY, ConnectionEntry
from forksafe.drivers import (
    dialect_drivers,
    driver_for_dialect,
    find_driver,
    supported_names,
    unwrap,
)
from forksafe.exceptions import UnsupportedObjectError

try:
    from sqlalchemy import event, exc
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine.events import DialectEvents
    from sqlalchemy.pool.base import Pool as _Pool
    from sqlalchemy.pool.base import _ConnectionFairy
except ImportError as _err:  # pragma: no cover - exercised by users without SQLAlchemy
    raise ImportError(
        "forksafe.sqlalchemy requires the SQLAlchemy package: pip install 'forksafe[sqlalchemy]'"
    ) from _err

__all__ = [  # noqa: F822 - SUPPORTED_DIALECT_DRIVERS comes from the module's __getattr__
    "DEFAULT_IDLE_CHECK",
    "SUPPORTED_DIALECT_DRIVERS",
    "EngineAdapter",
    "as_sync_engine",
    "is_engine",
    "server_idle_limit",
]

logger = logging.getLogger("forksafe")

# The ``_ConnectionRecord`` attribute holding a pooled connection's `_Liveness`. Not a key
# in ``record.info``: that dict is the application's ``Connection.info`` (it must stay
# JSON-able, comparable and free of forksafe's objects). Rewritten by every connect event;
# between an invalidation and the reconnect it describes the closed connection, which is
# harmless: the fast path only polls, and the full path checks the connection's identity.
_STATE_KEY = "_forksafe_liveness"
# What poll() reports for a socket that has something to say (POLLHUP, POLLERR and POLLNVAL
# are always reported).
_POLL_EVENTS = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)

# What only a closed (or half-closed: no server half-closes a live session) socket reports.
_CLOSED_EVENTS = (
    select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)
)

#: Seconds since a connection's previous checkout below which its socket is not polled (the
#: liveness check's one system call). A connection handed out again within that time was in
#: use a moment ago, so a close it misses arrived within that time; and no check closes the
#: race between the poll and the statement that follows it anyway (SQLAlchemy takes about
#: 20 µs from a checkout to a statement's first byte). 50 µs skips the poll only for
#: connections reused with no I/O in between (a loop of checkouts); a checkout after a
#: round trip to the server polls. HikariCP's equivalent (aliveBypassWindowMs) is 500 ms.
#: 0 polls at every checkout.
POLL_AFTER = 50e-6

_getpid = os.getpid
_monotonic = time.monotonic
_fairy_checkout = _ConnectionFairy._checkout


def _load_speedups() -> Any:
    """``forksafe._speedups`` (the checkout methods in C), or None: not built, turned off
    with ``FORKSAFE_NO_SPEEDUPS=1``, or a Python without the GIL (whose pool code the C
    methods do not guard)."""
    if os.environ.get("FORKSAFE_NO_SPEEDUPS", "") not in ("", "0"):
        return None
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    try:
        from forksafe import _speedups as module  # type: ignore[attr-defined]
    except ImportError:
        return None
    return module


_speedups = _load_speedups()


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_DIALECT_DRIVERS":
        # Computed on each use, so that drivers registered after import count.
        return dialect_drivers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """The connection records a pool holds right now (QueuePool, SingletonThreadPool, ...).

    Never connects: a ``StaticPool``'s record is read only if it already exists.
    """
    queue = getattr(getattr(pool, "_pool", None), "queue", None)
    if queue is not None:
        return list(queue)
    records = getattr(pool, "_all_conns", None)
    if records is not None:
        return list(records)
    # StaticPool.connection is a memoized property that *connects* on first access.
    single = vars(pool).get("connection")
    return [single] if single is not None else []


def _record_connection(record: Any) -> Any:
    """The DBAPI connection of a pool record (or of its checked-out wrapper), or None
    (``dbapi_connection`` since 1.4.24)."""
    conn = getattr(record, "dbapi_connection", _MISSING)
    return getattr(record, "connection", None) if conn is _MISSING else conn


_MISSING = object()


# -- per-connection state ---------------------------------------------------------------------
class _Liveness:
    """What forksafe keeps on a pooled connection's ``_ConnectionRecord``."""

    __slots__ = ("conn_id", "fd", "last", "learn", "plain_mysql", "poll", "poller", "retire",
                 "threshold")

    def __init__(self, conn_id: int, fd: int | None, plain_mysql: bool) -> None:
        self.conn_id = conn_id
        self.fd = -1 if fd is None else fd  # the socket's descriptor, -1 if none is known
        poller = None
        if fd is not None:
            poller = select.poll()
            poller.register(fd, _POLL_EVENTS)
        self.poller = poller  # a select.poll on the connection's socket, or None
        # what a checkout calls with 0: the poller's poll(), or nothing to read
        self.poll = poller.poll if poller is not None else _nothing_to_read
        self.plain_mysql = plain_mysql  # MySQL protocol without TLS: readable means closed
        self.last = _monotonic()  # time of the last checkout
        self.retire: float | None = None  # idle seconds after which it is replaced unseen
        self.learn = False  # ask the server's idle limit at the next checkout
        # Idle seconds from which a checkout takes the slow path; -inf: the next one does.
        self.threshold = math.inf


def _nothing_to_read(timeout: int) -> list[Any]:
    return []


def _is_tls(conn: Any) -> bool | None:
    """Whether a MySQL driver connection runs over TLS; None when the driver cannot say."""
    sock = getattr(conn, "_sock", None)  # PyMySQL
    if sock is not None:
        return isinstance(sock, ssl.SSLSocket)
    return None


# -- the pool subclasses ------------------------------------------------------------------------
# id(pool class) -> forksafe's lean subclass of it (which holds the pending one). Weak values:
# a subclass lives while an object has it as its class, and keeps its base alive (through
# __bases__), so an id is not reused while its entry exists; a class made at run time (a
# test's, a plugin's) is freed with its last tracked object, and with it all it refers to.
# The same for the dialect subclasses below.
_CLASSES: weakref.WeakValueDictionary[int, type] = weakref.WeakValueDictionary()
# Taken by track() (a child may track an engine while a parent's thread held it at fork):
# a ForkLock, which a child can always take.
_CLASSES_LOCK = _state.ForkLock("tracked classes")
# Orders untrack() against a pending pool's checkin in another thread (both change the
# pool's class and its _forksafe attributes). A ForkLock: a child can always take it.
_PENDING_LOCK = _state.ForkLock("pending pool")


def _tracked_classes(base: type) -> tuple[type, type]:
    """(lean, pending) subclasses of the pool class ``base``, made once per class."""
    with _CLASSES_LOCK:
        lean: Any = _CLASSES.get(id(base))
        if lean is None:
            lean, pending = _make_classes(base)
            lean._forksafe_pending_class = pending
            _CLASSES[id(base)] = lean
        return lean, lean._forksafe_pending_class


def _make_classes(base: Any) -> tuple[type, type]:
    base_connect = base.connect
    base_do_get = base._do_get
    base_recreate = base.recreate
    base_do_return_conn = base._do_return_conn
    # Pool.connect() is only ``_ConnectionFairy._checkout(self)``: call that directly (one
    # Python call less per checkout). A pool class with its own connect() keeps it.
    checkout = _fairy_checkout if base_connect is _Pool.connect else base_connect
    mark = _state.fork_mark()
    own = _state.OWN
    holds = _state._HOLDS
    monotonic = _monotonic
    key = _STATE_KEY

    def connect(self: Any) -> Any:
        # The wipe-on-fork mark reads 1 only in the process that wrote own.pid: no system
        # call here unless the kernel cannot do that (then the mark always reads 0).
        if mark[0] and self._forksafe_pid == own.pid:
            fairy = checkout(self)
            if holds:  # another thread's fork is under way and listed its holds already
                _state.hold_late(fairy)
            return fairy
        return _connect_checked(self, base_connect)

    def _do_get(self: Any) -> Any:
        rec = base_do_get(self)
        # From here nothing may raise: the record is out of the queue (or holds an overflow
        # slot) and only the caller's checkout would return it.
        try:
            state = getattr(rec, key, None)
            if state is not None:
                now = monotonic()
                idle = now - state.last
                if idle < state.threshold and (idle < POLL_AFTER or not state.poll(0)):
                    state.last = now
                    return rec
        except Exception:
            return _finish_checkout(self, rec)  # which meets it again, and reports it
        except BaseException as err:  # KeyboardInterrupt, greenlet exit: give it back
            _give_back(rec, err)
            raise
        return _finish_checkout(self, rec)

    if _speedups is not None:  # the same two methods in C (forksafe/_speedups.c)
        connect = _speedups.connect(checkout, _connect_checked, base_connect, own, holds,
                                    _state.hold_late, mark)
        _do_get = _speedups.do_get(base_do_get, _finish_checkout, _give_back, key,
                                   globals(), _Liveness, _POLL_EVENTS)

    def recreate(self: Any) -> Any:
        new = base_recreate(self)
        if type(new) is not lean:
            _set_class(new, lean)  # a pending pool's successor has nothing pending
        new._forksafe_adapter = self._forksafe_adapter
        new._forksafe_pid = _getpid()
        return new

    def _do_return_conn(self: Any, record: Any) -> None:
        # Only on a pool that had connections checked out when it was tracked.
        try:
            if getattr(record, _STATE_KEY, None) is None:
                self._forksafe_adapter._returned_untracked(self, record)
        except Exception as err:
            _fork.report_internal_error(err, "recording a connection checked in after track()")
        base_do_return_conn(self, record)

    namespace = {
        "__module__": base.__module__,
        "__doc__": base.__doc__,
        "_forksafe_base": base,
        "connect": connect,
        "_do_get": _do_get,
        "dispose": _dispose,
        "recreate": recreate,
    }
    lean = type(base.__name__, (base,), dict(namespace))
    pending = type(base.__name__, (lean,), {
        "__module__": base.__module__,
        "__doc__": base.__doc__,
        "_do_return_conn": _do_return_conn,
    })
    return lean, pending


# -- the dialect subclasses ---------------------------------------------------------------------
# SQLAlchemy 2.x reads ``dialect._has_events`` at every statement, and once a dialect has any
# listener (forksafe's ``handle_error`` is one, on 2.x a dialect event) it also looks for
# ``do_execute`` listeners at every statement: about 2,500 instructions, 0.8% of a checkout
# plus ``SELECT 1``. A tracked engine's dialect gets a subclass of its own class whose
# ``_has_events`` answers true only when it matters: the application listens for dialect
# events itself (on the dialect or its class), or an exception is being handled, which is
# when SQLAlchemy dispatches ``handle_error`` (it does so only from inside an ``except``
# block). A true answer in an ``except`` block of the application's own costs only the
# look for listeners that SQLAlchemy would make anyway. SQLAlchemy 1.4 has ``handle_error``
# on the engine instead, and its dialect is left as it is.
_HANDLE_ERROR_ON_DIALECT = "handle_error" in vars(DialectEvents)
_DIALECT_CLASSES: weakref.WeakValueDictionary[tuple[int, bool], type] = (
    weakref.WeakValueDictionary())
_handled_exception = getattr(sys, "exception", None) or (lambda: sys.exc_info()[1])


def _dialect_has_events(dialect: Any) -> bool:
    """A tracked dialect's ``_has_events`` (in C: ``_speedups.dialect_has_events``)."""
    return bool(
        dialect._forksafe_user_events
        or type(dialect)._forksafe_base._has_events
        or _handled_exception() is not None
    )


def _note_user_events(dialect: Any, value: Any) -> None:
    """``dialect._has_events = True``: SQLAlchemy adding a listener to the dialect."""
    vars(dialect)["_forksafe_user_events"] = bool(value)


def _dialect_class(base: type) -> type:
    """The tracked subclass of the dialect class ``base``, made once per class."""
    key = (id(base), _speedups is not None)
    with _CLASSES_LOCK:
        cls = _DIALECT_CLASSES.get(key)
        if cls is None:
            getter = _speedups.dialect_has_events if _speedups is not None else _dialect_has_events
            namespace: dict[str, Any] = {
                "__module__": base.__module__,
                "__doc__": base.__doc__,
                "_forksafe_base": base,
                "_forksafe_user_events": False,
                "_has_events": property(getter, _note_user_events),
            }
            # SQLAlchemy caches statements only for a class that says so in its own dict
            if "supports_statement_cache" in vars(base):
                namespace["supports_statement_cache"] = vars(base)["supports_statement_cache"]
            cls = _DIALECT_CLASSES[key] = type(base.__name__, (base,), namespace)
        return cls


def _is_tracked_dialect(dialect: Any) -> bool:
    return "_forksafe_base" in vars(type(dialect))


def _quiet_dialect(dialect: Any, user_events: bool) -> None:
    """Give a tracked engine's dialect its tracked class (after forksafe's ``handle_error``
    listener was added). ``user_events``: whether the dialect had listeners before."""
    try:
        if not _is_tracked_dialect(dialect):
            _set_class(dialect, _dialect_class(type(dialect)))
            vars(dialect).pop("_has_events", None)  # the class answers now
        # forksafe's own listener went through the class's setter too: not the application's
        vars(dialect)["_forksafe_user_events"] = user_events
        # engines that share a dialect (rare) each count: the last untrack() restores it
        vars(dialect)["_forksafe_adapters"] = vars(dialect).get("_forksafe_adapters", 0) + 1
    except Exception as err:  # the dialect keeps SQLAlchemy's own flag: correct, slower
        _fork.report_internal_error(err, "giving a tracked engine's dialect its class")


def _restore_dialect(dialect: Any) -> None:
    """Undo `_quiet_dialect` (at untrack(), after forksafe's listener was removed)."""
    if not _is_tracked_dialect(dialect):
        return
    own = vars(dialect)
    adapters = own.get("_forksafe_adapters", 1) - 1
    if adapters > 0:
        own["_forksafe_adapters"] = adapters
        return
    user_events = own.pop("_forksafe_user_events", False)
    own.pop("_forksafe_adapters", None)
    dialect.__class__ = type(dialect)._forksafe_base
    if user_events:
        dialect._has_events = True


def _set_class(pool: Any, cls: type) -> None:
    """Give a pool (or a dialect) another class, and its attributes a dict of their own.

    An object whose ``__class__`` was assigned keeps its attributes in the layout its first
    class shares among its instances, which CPython's attribute caches cannot use for the
    new class: every attribute read of SQLAlchemy's pool code on it (a few dozen per
    checkout) took the slow path. A plain dict of its own is one they can use again.
    Called at track() and on a new pool no other thread has seen yet (recreate); a pool
    that has its own dict changes class by ``__class__`` alone (pending to lean, untrack).
    """
    pool.__class__ = cls
    old = vars(pool)
    before = dict(old)
    pool.__dict__ = fresh = dict(before)
    # Another thread may have written an attribute (a QueuePool's overflow count, say)
    # between the copy and the swap, into the old dict: carry it over, unless the new dict
    # has changed that attribute since.
    for key, value in list(old.items()):
        was = before.get(key, _MISSING)
        if value is not was and fresh.get(key, _MISSING) is was:
            fresh[key] = value


def _context_connection(context: Any) -> Any:
    """The DBAPI connection a ``handle_error`` context's statement ran on, or None. Never
    reconnects (``Connection.connection`` would)."""
    fairy = getattr(context.connection, "_dbapi_connection", None)
    return None if fairy is None else _record_connection(fairy)


def _dispose(pool: Any) -> None:
    """A tracked pool's ``dispose()``, which closes its idle connections. In a process the
    pool was not made for (an at-fork hook registered before forksafe's, calling
    ``engine.dispose()``), the process is reset first: the inherited sockets are
    neutralised, and closing them sends nothing. Rare: the pid is asked every time."""
    if not _made_here(pool):
        _fork.after_fork()
    type(pool)._forksafe_base.dispose(pool)


def _from_the_driver(context: Any, dialect: Any) -> bool:
    """Whether a ``handle_error`` context's exception is a database error: one of the
    driver's DB-API errors, or one SQLAlchemy wrapped as such (a ``DBAPIError``; an
    application's error is wrapped, if at all, as a bare ``StatementError``)."""
    if isinstance(context.sqlalchemy_exception, exc.DBAPIError):
        return True
    # the dialect's module (``loaded_dbapi`` would raise InvalidRequestError without one)
    error = getattr(getattr(dialect, "dbapi", None), "Error", None)
    return isinstance(error, type) and isinstance(context.original_exception, error)


def _made_here(pool: Any) -> bool:
    """Whether ``pool`` was made for this process (asks the pid: a system call)."""
    return bool(vars(pool).get("_forksafe_pid") == _state.own_pid())


def _finish_checkout(pool: Any, rec: Any) -> Any:
    """The checkout's full liveness path, for a record the fast path of ``_do_get`` could
    not hand out as it is (a new or unknown connection, an idle time past a threshold, a
    readable socket, an error). Never raises an ``Exception``; returns the record."""
    try:
        state = getattr(rec, _STATE_KEY, None)
        pool._forksafe_adapter._checkout_slow(pool, rec, state, _monotonic())
    except Exception as err:
        _fork.report_internal_error(err, "forksafe's liveness check at checkout")
    except BaseException as err:  # KeyboardInterrupt, greenlet exit: give it back
        _give_back(rec, err)
        raise
    return rec


def _give_back(rec: Any, err: BaseException) -> None:
    """Return a record ``_do_get`` took to the pool, when ``err`` interrupts the checkout."""
    rec._checkin_failed(err, _fairy_was_created=False)


def _connect_checked(pool: Any, base_connect: Any) -> Any:
    """A checkout the mark could not vouch for: ask the pid (a system call)."""
    fairy = base_connect(pool) if _made_here(pool) else _connect_after_fork(pool, base_connect)
    _state.hold_late(fairy)  # if another thread's fork is under way
    return fairy


def _connect_after_fork(pool: Any, base_connect: Any) -> Any:
    """A checkout in a process the pool was not made for (a child): reset the process if no
    hook did, give the engine its fresh pool, and serve the checkout from that one. The
    inherited pool is never used: no session is opened in it and its lock (which a parent
    thread may have held at fork) is never taken."""
    _fork.after_fork()
    if vars(pool).get("_forksafe_pid") == _getpid():
        return base_connect(pool)  # the reset kept this pool (an in-memory SQLite database)
    adapter = vars(pool).get("_forksafe_adapter")
    engine = adapter._engine() if adapter is not None else None
    if engine is not None:
        if engine.pool is pool:
            engine.dispose(close=False)  # close=False: nothing of the old pool is touched
        current = engine.pool
        if current is not pool:
            return current.connect()
    # No engine any more (the pool outlived it): start the pool over in this process. Its
    # connections were registered, hence neutralised by the reset, so recycling them cannot
    # reach the parent's sessions.
    pool._forksafe_pid = _getpid()
    pool._invalidate_time = time.time()
    return base_connect(pool)


def _is_tracked_pool(pool: Any) -> bool:
    return "_forksafe_base" in vars(type(pool)) or "_forksafe_base" in vars(type(pool).__base__)


class EngineAdapter:
    """Makes one engine's pool forksafe's, and resets it in a child."""

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
        # a third-party dialect may leave SQLAlchemy's ``driver`` annotation unset
        driver = getattr(engine.dialect, "driver", None)
        if driver not in dialect_drivers():
            raise UnsupportedObjectError(
                f"forksafe cannot protect {describe(engine)}: its driver {driver!r} is not "
                f"supported. Supported drivers: {supported_names()} (SQLAlchemy dialect "
                f"drivers {', '.join(sorted(dialect_drivers()))}); forksafe.register_driver() "
                "adds another."
            )
        found = driver_for_dialect(driver)
        # SQLite: no socket to neutralise; the pool's records are remembered (weakly) so that
        # a child can park their connections and keep its hands off them
        self._park = found is not None and found.park
        self._records: weakref.WeakSet[Any] = weakref.WeakSet()
        self._engine_ref = weakref.ref(engine)
        self._origin = describe(engine)
        self._listeners: list[tuple[str, Any]] = []
        # Weakly: the registry holds the adapter strongly, and a dialect may refer back to
        # its engine (a do_connect listener closing over it), which would then never be
        # freed. The pool holds the dialect for as long as it can check out.
        self._dialect_ref = weakref.ref(engine.dialect)
        self._dialect_name: str = engine.dialect.name
        self._mysql = self._dialect_name in ("mysql", "mariadb")
        self.idle_check = idle_check
        # "auto" learns the server's limit at each connection's first checkout. It never
        # touches the pool's own ``pool_recycle`` (an age limit the user chose).
        self._learn_limit = recycle == "auto"
        self.retire_after: float | None = (
            float(recycle) if isinstance(recycle, (int, float)) else None
        )
        self._limits_logged: set[float] = set()

    # -- hooks -----------------------------------------------------------------------------
    def attach(self) -> None:
        """Make the engine's pool a tracked one, add the two listeners, record what the
        pool holds. Never connects."""
        engine = self._engine()
        if engine is None:
            return
        dialect: Any = engine.dialect
        # whether the application has dialect listeners, read before forksafe's listener
        # sets the flag (a dialect tracked already, shared with another engine, keeps it
        # apart from SQLAlchemy's)
        key = "_forksafe_user_events" if _is_tracked_dialect(dialect) else "_has_events"
        user_events = bool(vars(dialect).get(key))
        self._listen(engine, "connect", self._on_connect)
        self._listen(engine, "handle_error", self._on_error)
        if _HANDLE_ERROR_ON_DIALECT:
            _quiet_dialect(dialect, user_events)
        pool: Any = engine.pool
        if not _is_tracked_pool(pool):
            checked_out = 0
            try:
                checked_out = int(getattr(pool, "checkedout", lambda: 0)())
            except Exception:  # a pool type without a count: nothing pending
                checked_out = 0
            lean, pending = _tracked_classes(type(pool))
            pool._forksafe_adapter = self
            pool._forksafe_pid = _getpid()
            pool._forksafe_pending = checked_out
            _set_class(pool, pending if checked_out > 0 else lean)
        for record in _idle_records(pool):
            conn = _record_connection(record)
            if conn is not None:
                self._new_state(record, conn)

    def detach(self) -> None:
        """Remove the listeners and give the pool its own class back."""
        engine = self._engine()
        listeners, self._listeners = self._listeners, []
        if engine is None:
            return
        for name, fn in listeners:
            if event.contains(engine, name, fn):
                event.remove(engine, name, fn)
        if listeners and _HANDLE_ERROR_ON_DIALECT:
            _restore_dialect(engine.dialect)
        pool: Any = engine.pool
        if vars(pool).get("_forksafe_pid", _getpid()) != _getpid():
            engine.dispose(close=False)  # a child that has not used the engine yet
            pool = engine.pool
        with _PENDING_LOCK:  # not while another thread records a returned connection
            if not (_is_tracked_pool(pool) and vars(pool).get("_forksafe_adapter") is self):
                return
            # track() gave the pool a dict of its own: a class change alone keeps it fast,
            # and no other thread's write can fall between two dicts
            pool.__class__ = type(pool)._forksafe_base
            vars(pool).pop("_forksafe_adapter", None)
            vars(pool).pop("_forksafe_pid", None)
            vars(pool).pop("_forksafe_pending", None)
            for record in _idle_records(pool):
                vars(record).pop(_STATE_KEY, None)

    def _listen(self, engine: Engine, name: str, fn: Any) -> None:
        event.listen(engine, name, fn)
        self._listeners.append((name, fn))

    def _engine(self) -> Engine | None:
        return self._engine_ref()

    def _new_state(self, record: Any, dbapi_connection: Any) -> _Liveness:
        """Record a pooled connection: in the registry, and its liveness state."""
        conn = unwrap(dbapi_connection)
        driver = find_driver(conn)
        fd = None
        plain_mysql = False
        if self._park:
            self._records.add(record)
        elif driver is not None:
            # track() in a child, of an engine the parent did not track: its pool may hold
            # the parent's connections (the liveness check then replaces them at checkout)
            _fork.neutralise_if_inherited(conn, driver, self._origin)
            REGISTRY.add_connection(
                conn,
                ConnectionEntry(driver=driver, pid=_getpid(), origin=self._origin, owner=self,
                                record=weakref.ref(record)),
            )
            try:
                fd = driver.socket_fd(conn)
            except Exception as err:
                _fork.report_internal_error(
                    err, f"finding the socket of a {driver.name} connection"
                )
                fd = None
            plain_mysql = self._mysql and _is_tls(conn) is False
        state = _Liveness(id(dbapi_connection), fd, plain_mysql)
        state.retire = self.retire_after
        state.learn = self._learn_limit
        self._set_threshold(state)
        setattr(record, _STATE_KEY, state)
        return state

    def _set_threshold(self, state: _Liveness) -> None:
        if state.learn:
            state.threshold = -math.inf
            return
        candidates = [t for t in (self.idle_check, state.retire) if t is not None]
        state.threshold = min(candidates) if candidates else math.inf

    def _on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        self._new_state(connection_record, dbapi_connection)

    def _returned_untracked(self, pool: Any, record: Any) -> None:
        """A connection checked out before track() came back: record it. Once none is
        out any more, the pool becomes the lean class. Under ``_PENDING_LOCK``: an
        untrack() in another thread either comes first (then nothing is done here; the
        method was looked up on the pending class before it) or waits."""
        with _PENDING_LOCK:
            if vars(pool).get("_forksafe_adapter") is not self:
                return  # untracked meanwhile
            conn = _record_connection(record)
            if conn is not None:
                self._new_state(record, conn)
            pool._forksafe_pending -= 1
            try:  # those checked out meanwhile are counted too: never more than this
                out = int(pool.checkedout()) - 1  # counted until the base returns it
            except Exception:
                out = 0
            if pool._forksafe_pending <= 0 or out <= 0:
                lean, _ = _tracked_classes(type(pool)._forksafe_base)
                pool.__class__ = lean  # its dict is its own since track(): see _set_class

    def _on_error(self, context: Any) -> None:
        # SQLAlchemy's error carries the statement: its size tells a packet too large
        original = context.sqlalchemy_exception or context.original_exception
        if _fork.was_neutralised(_context_connection(context)):
            errors.mark_inherited(context.original_exception)
        kind = errors.classify(original)
        if kind is None:
            return
        if kind.disconnect:
            if not _from_the_driver(context, self._dialect_ref()):
                return  # the application's own error (a key service's ConnectionError
                # raised in a TypeDecorator), whatever its words: the connection is fine
            context.is_disconnect = True
        errors.report(original, self._origin)

    # -- checkout --------------------------------------------------------------------------
    def _checkout_slow(self, pool: Any, record: Any, state: _Liveness | None, now: float) -> None:
        """The rare part of a checkout: a new or unknown connection, a readable socket, an
        idle time past a threshold. Replaces a dead connection by invalidating its record
        (SQLAlchemy then reconnects it before handing it out)."""
        conn = _record_connection(record)
        if conn is None:
            return  # invalidated earlier: SQLAlchemy reconnects it now
        if getattr(pool, "_invalidate_time", 0) > getattr(record, "starttime", math.inf):
            return  # older than a pool-wide invalidation: SQLAlchemy replaces it unpinged
        if state is None or state.conn_id != id(conn):
            state = self._new_state(record, conn)
            state.last = now
        idle = now - state.last
        state.last = now
        if state.learn:
            state.learn = False
            self._learn(conn, state)
            self._set_threshold(state)
            idle = 0.0  # a new connection
        reason = None
        invalidate_pool = False
        readable = state.poller.poll(0) if state.poller is not None else []
        if readable:
            if state.plain_mysql or any(ev & _CLOSED_EVENTS for _, ev in readable):
                reason = "the server closed it while it was idle"
            else:
                reason = self._ping(conn, "its socket was readable while idle")
        elif state.retire is not None and idle >= state.retire:
            reason = (f"idle {idle:.1f}s, past {state.retire:.1f}s (90% of the server's idle "
                      "limit, or recycle=)")
        elif self.idle_check is not None and idle >= self.idle_check:
            reason = self._ping(conn, f"idle {idle:.1f}s")
            invalidate_pool = reason is not None
        if reason is None:
            return
        logger.debug("%s: replacing a pooled connection before use: %s",
                     self._origin, reason)
        if invalidate_pool:
            # A silent failure of an idle connection usually means a restart or a cut:
            # every connection older than this one is recycled at its next checkout.
            pool._invalidate_time = time.time()
        record.invalidate(exc.DisconnectionError(f"forksafe: {reason}"))

    def _ping(self, conn: Any, why: str) -> str | None:
        """None if the connection answers a ping; else why it is replaced."""
        if pg_transaction_status(conn) in PG_IN_TRANSACTION:
            # Returned inside the application's transaction (pool_reset_on_return=None):
            # psycopg's ping turns autocommit on, which the driver refuses there, and the
            # healthy connection would be replaced with the work in it. The poll saw no
            # close; a silent failure shows at its next statement, as without a ping.
            return None
        try:
            dialect = self._dialect_ref()
            if dialect is None:  # the engine and its pool are being freed
                return None
            alive = dialect.do_ping(conn)
        except Exception as err:
            errors.report(err, self._origin)
            return f"{why}, and it failed a ping ({err!r})"
        return None if alive else f"{why}, and it failed a ping"

    def _learn(self, conn: Any, state: _Liveness) -> None:
        """Ask the server its idle limit (after the application's connect listeners ran)."""
        try:
            limit = server_idle_limit(self._dialect_name, conn)
        except Exception as err:  # never fail a checkout over an optimisation
            # (server_idle_limit leaves the connection as it found it, even when it fails)
            logger.debug("%s: could not read the server's idle limit: %r",
                         self._origin, err)
            return
        if limit is None:
            return
        retire = limit * RETIRE_FRACTION
        if self.retire_after is not None:
            retire = min(retire, self.retire_after)
        state.retire = retire
        if limit not in self._limits_logged and len(self._limits_logged) < 16:
            self._limits_logged.add(limit)
            logger.debug("%s: the server closes connections idle %gs; forksafe "
                         "replaces them after %gs idle", self._origin, limit, retire)

    # -- fork ------------------------------------------------------------------------------
    def reset_in_child(self) -> None:
        """Make sure the engine gets a fresh pool in this child, closing nothing.

        A pool of forksafe's already knows: it was made for another pid, and its first
        checkout here replaces it (``dispose(close=False)``) before anything else. Building
        SQLAlchemy pools is what a reset with many engines would spend its time on, so it
        happens only for the engines the child uses. Any other pool is replaced now.
        """
        engine = self._engine()
        if engine is None:
            return
        if self._park:
            if _memory_database(engine):
                # the child's own copy of the parent's memory: nothing is shared, and the
                # pool stays as it is (its first checkout must not replace it)
                vars(engine.pool)["_forksafe_pid"] = _getpid()
                return
            inherited = [c for c in map(_record_connection, list(self._records)) if c is not None]
            # never finalised by the child, not even at exit (closing rolls back the
            # parent's transaction and deletes its journal)
            _fork.park((engine.pool, inherited))
            _guard_inherited(engine.dialect, inherited)
            engine.dispose(close=False)
            return
        pool = engine.pool
        if vars(pool).get("_forksafe_adapter") is self and _is_tracked_pool(pool):
            return
        engine.dispose(close=False)


class InheritedSQLiteConnectionError(RuntimeError):
    """A child used a SQLite connection it inherited from its parent."""


def _guard_inherited(dialect: Any, conns: list[Any]) -> None:
    """In a child: the dialect never closes, rolls back or commits an inherited (parked)
    SQLite connection, and refuses to execute on one, with a clear error.

    A SQLAlchemy ``Connection`` held across the fork ends up there: returned to the old
    pool, garbage collected or finalised at exit. Wraps the dialect instance's ``do_*``
    methods, in the child only; connections the child opens are not affected.
    """
    ids = {id(c) for c in conns} | {id(unwrap(c)) for c in conns}
    if not ids:
        return

    def inherited(conn: Any) -> bool:
        return conn is not None and (id(conn) in ids or id(unwrap(conn)) in ids)

    def skipping(original: Any) -> Any:
        def do(dbapi_connection: Any, *args: Any, **kwargs: Any) -> Any:
            if inherited(dbapi_connection):
                return None
            return original(dbapi_connection, *args, **kwargs)

        return do

    def refusing(original: Any) -> Any:
        def do(cursor: Any, *args: Any, **kwargs: Any) -> Any:
            context = kwargs.get("context", args[-1] if args else None)
            conn = getattr(context, "_dbapi_connection", None) or getattr(
                cursor, "connection", None
            )
            if inherited(conn):
                raise InheritedSQLiteConnectionError(
                    "forksafe: this SQLite connection was inherited from the parent process "
                    f"(pid {os.getppid()}), which may hold its locks and journal; the child "
                    "must not use it. Close the SQLAlchemy Connection held across the fork "
                    "and open a new one from the engine."
                )
            return original(cursor, *args, **kwargs)

        return do

    for name in ("do_rollback", "do_commit", "do_close", "do_terminate"):
        setattr(dialect, name, skipping(getattr(dialect, name)))
    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        setattr(dialect, name, refusing(getattr(dialect, name)))


def _memory_database(engine: Engine) -> bool:
    """A SQLite database in memory (``sqlite://``, ``:memory:``, ``mode=memory``)."""
    database = engine.url.database
    return database in (None, "", ":memory:") or "mode=memory" in str(database) or (
        engine.url.query.get("mode") == "memory"
    )
