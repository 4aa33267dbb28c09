"""forksafe: database connections that survive ``fork()``.

``forksafe.track(engine)`` and every forked child (gunicorn and uWSGI workers,
multiprocessing, Celery prefork) gets a fresh pool, while nothing the child does (close,
garbage collection, exit) can send a byte on a socket it inherited from its parent.

Importing forksafe installs an ``os.register_at_fork`` hook; it imports no framework and no
driver.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from forksafe import _fork, errors
from forksafe._fork import after_fork, internal_errors
from forksafe._idle_limit import DEFAULT_IDLE_CHECK
from forksafe._instrument import (
    ConnectionInfo,
    configure,
    connections,
    instrument,
    is_instrumented,
    uninstrument,
)
from forksafe._process_local import ProcessLocal
from forksafe._registry import REGISTRY, ConnectionEntry
from forksafe.drivers import (
    find_driver,
    register_driver,
    supported_names,
    unregister_driver,
    unwrap,
)
from forksafe.exceptions import (
    ChildDeadlockedError,
    CommitUnknownError,
    ForksafeError,
    ForkSafetyWarning,
    UnsupportedObjectError,
    UntrackedConnectionError,
)
from forksafe.retry import retry_on_disconnect, retrying

__all__ = [
    "ChildDeadlockedError",
    "CommitUnknownError",
    "ConnectionInfo",
    "ForkSafetyWarning",
    "ForksafeError",
    "ProcessLocal",
    "UnsupportedObjectError",
    "UntrackedConnectionError",
    "__version__",
    "after_fork",
    "configure",
    "connections",
    "errors",
    "instrument",
    "internal_errors",
    "is_instrumented",
    "is_tracked",
    "register_after_fork",
    "register_driver",
    "retry_on_disconnect",
    "retrying",
    "track",
    "uninstrument",
    "unregister_after_fork",
    "unregister_driver",
    "untrack",
]

__version__ = "0.1.0"

T = TypeVar("T")

_SUPPORTED = (
    "a SQLAlchemy Engine or AsyncEngine, or a DBAPI connection of "
    "{drivers}"
)


def _engine_module() -> Any:
    """forksafe.sqlalchemy, if SQLAlchemy is loaded (an engine cannot exist otherwise)."""
    if "sqlalchemy" not in sys.modules:
        return None
    from forksafe import sqlalchemy as sa_adapter

    return sa_adapter


def track(
    obj: T,
    *,
    idle_check: float | None = DEFAULT_IDLE_CHECK,
    recycle: float | str | None = "auto",
) -> T:
    """Protect ``obj`` across forks and return it unchanged.

    Accepts a SQLAlchemy ``Engine`` (1.4 and 2.x), an ``AsyncEngine`` (through its sync
    engine), or a raw DBAPI connection of a known driver: mysqlclient, PyMySQL,
    mysql-connector, MariaDB Connector/Python, psycopg2, psycopg 3, pg8000, asyncpg,
    aiomysql, asyncmy and aiosqlite, and any added by `register_driver` (a sqlite3
    connection cannot be held weakly: track its engine).
    Tracking holds ``obj`` weakly, is thread-safe, and tracking twice is harmless. Track an
    engine before other threads connect through it (or while none does): it adds two
    SQLAlchemy listeners, and SQLAlchemy does not allow that while another thread
    dispatches the same event.

    After a fork, in the child: a tracked engine gets a fresh pool with the same settings,
    and every connection it (or a tracked raw connection) held is neutralised: its socket
    is replaced so that neither ``close()``, garbage collection nor exit can reach the
    parent's session. Using a neutralised connection fails at once with the driver's
    "not connected" error. The parent keeps its connections.

    For engines, forksafe also checks each pooled connection as it is handed out, without a
    round trip: one zero-timeout ``poll()`` of its socket shows whether the server closed
    it while idle (``KILL``, a restart, an idle limit), and such a connection is replaced
    first. One idle at least ``idle_check`` seconds is also pinged (a silent network cut
    shows nothing in the socket), and a failed ping makes the pool drop every older
    connection.

    Args:
        obj: the engine or connection to protect.
        idle_check: (engines only) ping a pooled connection at checkout when it has been
            idle at least this many seconds; None never pings. ``0`` pings every time,
            like ``pool_pre_ping``.
        recycle: (engines only) when to replace an idle connection without pinging it:
            ``"auto"`` (default) asks the server its idle limit at each connection's first
            checkout, after the application's connect listeners ran (MySQL/MariaDB
            ``wait_timeout``, PostgreSQL ``idle_session_timeout``) and replaces a
            connection idle for 90% of it; seconds sets that idle limit directly; None
            turns it off. A ``pool_recycle`` you set is never changed (SQLAlchemy applies
            it by age, alongside). Options apply when the engine is first tracked.

    Returns:
        ``obj`` itself, so ``engine = forksafe.track(create_engine(url))`` reads naturally.

    Raises:
        UnsupportedObjectError: (a ``TypeError``) for anything else, naming what is supported.
        ValueError: an ``idle_check`` or ``recycle`` that is not a valid number of seconds.
    """
    _fork.after_fork()  # tracking in a child that no hook reset: make its state current first
    sa_adapter = _engine_module()
    if sa_adapter is not None and sa_adapter.is_engine(obj):
        engine = sa_adapter.as_sync_engine(obj)
        if not REGISTRY.is_engine_tracked(engine):
            adapter = sa_adapter.EngineAdapter(engine, idle_check=idle_check, recycle=recycle)
            if REGISTRY.add_engine(engine, adapter):
                adapter.attach()
        return obj
    conn = unwrap(obj)
    driver = find_driver(conn)
    if driver is None:
        raise UnsupportedObjectError(
            f"forksafe.track() cannot protect a {type(obj).__module__}.{type(obj).__qualname__}; "
            f"it supports {_SUPPORTED.format(drivers=supported_names())}."
        )
    _fork.neutralise_if_inherited(conn, driver, "forksafe.track()")
    try:
        REGISTRY.add_connection(
            conn, ConnectionEntry(driver=driver, pid=os.getpid(), origin="track()")
        )
    except TypeError as err:  # sqlite3.Connection: no weak reference possible
        raise UnsupportedObjectError(
            f"forksafe.track() cannot hold a raw {driver.name} connection weakly ({err}); "
            "track the engine instead (forksafe.track(create_engine('sqlite:///app.db'))), "
            "or open the connection after the fork."
        ) from err
    return obj


F = TypeVar("F", bound=Callable[[], object])


def register_after_fork(fn: F) -> F:
    """Run ``fn()`` in every child once forksafe has reset it, whichever hook did (``os.fork``,
    the gunicorn or uWSGI hook, a fork detected at a tracked engine's checkout).

    For state forksafe does not know, held by another library or by the app: a connection
    pool of its own (psycopg_pool, peewee), a client object to rebuild. When ``fn`` runs,
    every tracked connection the child inherited is neutralised already, so closing or
    dropping them there sends nothing. Usable as a decorator; returns ``fn``. Callbacks run
    in registration order; registering one twice is a no-op. One that raises is logged on
    the ``forksafe`` logger (and in `internal_errors`), and the others still run: nothing
    reaches the host server.
    """
    if not callable(fn):
        raise TypeError(f"forksafe.register_after_fork() needs a callable, not {fn!r}")
    _fork.register_child_callback(fn, phase=_fork.AFTER_RESET)
    return fn


def unregister_after_fork(fn: Callable[[], object]) -> bool:
    """Remove a callback added by `register_after_fork`; return whether it was registered."""
    return _fork.unregister_child_callback(fn, phase=_fork.AFTER_RESET)


def untrack(obj: object) -> bool:
    """Stop protecting ``obj``. Returns whether it was tracked.

    An engine's pool listeners are removed and the connections it opened are forgotten.
    """
    sa_adapter = _engine_module()
    if sa_adapter is not None and sa_adapter.is_engine(obj):
        adapter = REGISTRY.pop_engine(sa_adapter.as_sync_engine(obj))
        if adapter is None:
            return False
        adapter.detach()
        REGISTRY.discard_owner(adapter)
        return True
    return REGISTRY.discard_connection(unwrap(obj))


def is_tracked(obj: object) -> bool:
    """Whether ``obj`` (an engine or a DBAPI connection) is tracked in this process."""
    sa_adapter = _engine_module()
    if sa_adapter is not None and sa_adapter.is_engine(obj):
        return REGISTRY.is_engine_tracked(sa_adapter.as_sync_engine(obj))
    return REGISTRY.connection_entry(unwrap(obj)) is not None


_fork.install_os_hooks()
