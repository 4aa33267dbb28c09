"""What forksafe needs to know about each DBAPI driver: how to find a connection's socket.

Drivers are recognised by class, looked up in ``sys.modules`` only: forksafe never imports
a driver itself, so ``import forksafe`` stays free of optional dependencies.

What each driver sends when a *child* lets go of an inherited connection (measured against
MariaDB 10.11 and PostgreSQL 15), which is why the socket itself must be neutralised:

================  ======================  ==============================================
driver            ``close()`` in child     garbage collection / interpreter exit
================  ======================  ==============================================
mysqlclient       COM_QUIT                 COM_QUIT (``mysql_close`` in the destructor)
PyMySQL           COM_QUIT                 nothing
psycopg2          Terminate                nothing (dealloc checks the pid)
psycopg 3         Terminate                nothing
================  ======================  ==============================================
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DRIVERS", "Driver", "dialect_drivers", "find_driver", "supported_names", "unwrap"]


@dataclass(frozen=True)
class Driver:
    """How to reach the socket of one driver's connections.

    Attributes:
        name: the name users know the driver by.
        module: the module whose classes identify its connections.
        classes: dotted paths, relative to ``sys.modules``, of its connection classes.
        socket_fd: returns the connection's socket descriptor, or None when the driver
            says, explicitly, that the connection is closed. It must not guess: any failure
            to tell (an attribute that moved in a new release, say) raises, and the caller
            reports it as an internal error instead of reading it as "closed".
        dialects: the ``engine.dialect.driver`` names of SQLAlchemy dialects built on it.
        constructors: what `forksafe.instrument` wraps to see every new connection, as
            ``"module:qualname"``: a class's ``__init__`` (``"MySQLdb.connections:
            Connection.__init__"``) or a module-level function (``"psycopg2:connect"``).
    """

    name: str
    module: str
    classes: tuple[str, ...]
    socket_fd: Callable[[Any], int | None]
    dialects: tuple[str, ...] = ()
    constructors: tuple[str, ...] = ()

    def matches(self, conn: object) -> bool:
        """Return True if ``conn`` is a connection of this driver (without importing it)."""
        if self.module not in sys.modules:
            return False
        for path in self.classes:
            cls = _resolve(path)
            if cls is not None and isinstance(conn, cls):
                return True
        return False


def _resolve(path: str) -> type | None:
    module_name, _, attr = path.rpartition(".")
    module = sys.modules.get(module_name)
    found = getattr(module, attr, None) if module is not None else None
    return found if isinstance(found, type) else None


def _mysqlclient_fd(conn: Any) -> int | None:
    if not getattr(conn, "open", False):
        return None
    fd: int = conn.fileno()
    return fd


def _pymysql_fd(conn: Any) -> int | None:
    sock = getattr(conn, "_sock", None)
    if sock is None:
        return None
    fd: int = sock.fileno()
    return fd if fd >= 0 else None


def _libpq_fd(conn: Any) -> int | None:
    # psycopg2: ``closed`` is an int (0 open); psycopg 3: a bool.
    if conn.closed:
        return None
    fd: int = conn.fileno()
    return fd


DRIVERS: tuple[Driver, ...] = (
    Driver(
        "mysqlclient",
        "MySQLdb",
        ("MySQLdb.connections.Connection",),
        _mysqlclient_fd,
        dialects=("mysqldb",),
        constructors=("MySQLdb.connections:Connection.__init__",),
    ),
    Driver(
        "PyMySQL",
        "pymysql",
        ("pymysql.connections.Connection",),
        _pymysql_fd,
        dialects=("pymysql",),
        constructors=("pymysql.connections:Connection.__init__",),
    ),
    Driver(
        "psycopg2",
        "psycopg2",
        ("psycopg2.extensions.connection",),
        _libpq_fd,
        dialects=("psycopg2",),
        # psycopg2's connection class is written in C: its __init__ cannot be replaced
        constructors=("psycopg2:connect",),
    ),
    Driver(
        "psycopg",
        "psycopg",
        ("psycopg.connection.BaseConnection", "psycopg.Connection", "psycopg.AsyncConnection"),
        _libpq_fd,
        dialects=("psycopg", "psycopg_async"),
        constructors=("psycopg:BaseConnection.__init__",),
    ),
)


def unwrap(conn: Any) -> Any:
    """Return the driver's own connection behind SQLAlchemy's wrappers, if any.

    Handles a pool-proxied connection (``engine.raw_connection()``) and the adapters of
    asyncio drivers (``AdaptedConnection.driver_connection``).
    """
    for attr in ("dbapi_connection", "driver_connection"):
        inner = getattr(conn, attr, None)
        if inner is not None and inner is not conn:
            conn = inner
    return conn


def find_driver(conn: object) -> Driver | None:
    """Return the `Driver` that ``conn`` belongs to, or None if it is not a known one."""
    for driver in DRIVERS:
        if driver.matches(conn):
            return driver
    return None


def dialect_drivers() -> frozenset[str]:
    """Every ``engine.dialect.driver`` name whose connections forksafe can protect."""
    return frozenset(name for driver in DRIVERS for name in driver.dialects)


def supported_names() -> str:
    """The supported drivers, for error messages."""
    return ", ".join(d.name for d in DRIVERS)
