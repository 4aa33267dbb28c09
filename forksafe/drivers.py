"""What forksafe needs to know about each DBAPI driver: how to find a connection's socket.

Drivers are recognised by class, looked up in ``sys.modules`` only: forksafe never imports
a driver itself, so ``import forksafe`` stays free of optional dependencies.

What each driver does when a *child* lets go of an inherited connection (measured against
MariaDB 10.11 and PostgreSQL 15; ``tests/integration/test_driver_matrix.py`` asserts it),
which is why the socket itself must be neutralised:

====================  ===============  ==================================================
driver                ``close()``      garbage collection / interpreter exit
====================  ===============  ==================================================
mysqlclient           COM_QUIT         COM_QUIT (``mysql_close`` in the destructor)
PyMySQL               COM_QUIT         nothing
mysql-connector (C)   COM_QUIT         COM_QUIT (``mysql_close`` in the destructor)
mysql-connector (py)  COM_QUIT         COM_QUIT at garbage collection (``__del__``)
mariadb               COM_QUIT         COM_QUIT (``mysql_close`` in the destructor)
aiomysql              COM_QUIT         unregisters the parent's socket from the epoll set
                                       the child shares with the parent's event loop
asyncmy               COM_QUIT         nothing
psycopg2              Terminate        nothing (dealloc checks the pid)
psycopg 3             Terminate        nothing
asyncpg               Terminate        the session ends at garbage collection
pg8000                Terminate        nothing
====================  ===============  ==================================================

Drivers of asyncio reach their socket through the transport
(``transport.get_extra_info("socket")``): reading it touches neither the event loop nor
anything scheduled on it. Other drivers: `register_driver`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DRIVERS",
    "Driver",
    "all_drivers",
    "dialect_drivers",
    "driver_for_dialect",
    "find_driver",
    "register_driver",
    "supported_names",
    "unregister_driver",
    "unwrap",
]


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
        park: the driver has no socket (SQLite). An inherited connection is *parked*
            instead: kept referenced for the rest of the child's life, so that no
            destructor ever closes it (closing rolls back and deletes the parent's
            journal); an engine's old pool is parked whole. ``socket_fd`` is not used.
    """

    name: str
    module: str
    classes: tuple[str, ...]
    socket_fd: Callable[[Any], int | None]
    dialects: tuple[str, ...] = ()
    constructors: tuple[str, ...] = ()
    park: bool = False

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
    """The class at dotted ``path``, looked up in ``sys.modules`` only (never imported).

    The module part is the longest prefix that is a loaded module, so nested classes
    (``pkg.mod.Outer.Inner``) resolve too.
    """
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        found: Any = module
        for attr in parts[cut:]:
            found = getattr(found, attr, None)
            if found is None:
                return None
        return found if isinstance(found, type) else None
    return None


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


def _transport_fd(transport: Any) -> int:
    """The descriptor of an asyncio transport's socket, read without touching its loop."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise RuntimeError(f"the asyncio transport {transport!r} exposes no socket")
    fd: int = sock.fileno()
    if fd < 0:
        raise RuntimeError(f"the asyncio transport {transport!r} has a closed socket")
    return fd


def _asyncpg_fd(conn: Any) -> int | None:
    # is_closed(): aborted, or the protocol says the transport is gone (no I/O, no loop call)
    if conn.is_closed():
        return None
    return _transport_fd(conn._transport)


def _aiomysql_fd(conn: Any) -> int | None:
    if conn.closed:  # aiomysql: ``closed`` is ``self._writer is None``
        return None
    return _transport_fd(conn._writer.transport)


def _asyncmy_fd(conn: Any) -> int | None:
    if not conn.connected:
        return None
    return _transport_fd(conn._transport)


def _mysql_connector_fd(conn: Any) -> int | None:
    """mysql-connector-python: the pure-Python class or the C extension's."""
    if hasattr(conn, "_cmysql"):
        return _cmysql_fd(conn)
    channel = conn._socket  # MySQLTCPSocket / MySQLUnixSocket; None before connect
    if channel is None or channel.sock is None:
        return None
    fd: int = channel.sock.fileno()
    return fd if fd >= 0 else None  # a closed socket.socket says -1


#: Where ``NET.fd`` sits in the C extension's ``MySQL`` object: ``PyObject_HEAD`` (16 bytes),
#: then the embedded ``MYSQL`` struct, whose first member is ``NET``: ``vio`` and four buffer
#: pointers, then ``my_socket fd`` (libmysqlclient 8.0 to 9.x).
_CMYSQL_NET_FD_OFFSET = 16 + 8 + 4 * 8


def _cmysql_fd(conn: Any) -> int | None:
    """The socket of mysql-connector's C extension connection (``CMySQLConnection``).

    Its C type exposes no descriptor. libmysqlclient keeps it in ``MYSQL.net.fd``, which the
    extension embeds at a fixed place in its object; forksafe reads it there and then
    *proves* it is this connection's socket: the descriptor must be an open socket in this
    process whose peer is the server the connection says it talks to (its TCP host and
    port, or its unix socket path). Anything else (another layout after an upgrade) raises
    instead of guessing, and is reported as an internal error.
    """
    cmysql = conn._cmysql
    if cmysql is None or not cmysql.connected():  # connected(): a flag, no round trip
        return None
    import ctypes
    import socket
    import stat

    fd = ctypes.c_int.from_address(id(cmysql) + _CMYSQL_NET_FD_OFFSET).value
    why = f"mysql-connector's C connection: MYSQL.net.fd reads {fd}"
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError as err:
        raise RuntimeError(f"{why}, not an open descriptor ({err})") from err
    if not is_socket:
        raise RuntimeError(f"{why}, which is not a socket")
    probe = socket.socket(fileno=fd)
    try:
        peer = probe.getpeername()
        family = probe.family
    finally:
        probe.detach()
    if family == socket.AF_UNIX:
        expected: object = conn.unix_socket
        matches = bool(expected) and peer == expected
    else:
        expected = (conn.server_host, int(conn.server_port))
        matches = int(peer[1]) == expected[1] and _same_host(str(peer[0]), str(expected[0]))
    if not matches:
        raise RuntimeError(f"{why}, whose peer {peer!r} is not the server {expected!r}")
    return fd


def _same_host(address: str, host: str) -> bool:
    import socket

    if address == host:
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return any(info[4][0] == address for info in infos)


def _mariadb_fd(conn: Any) -> int | None:
    # MariaDB Connector/Python: ``_closed`` is set by close(); ``_get_socket()`` is the C
    # API's mysql_get_socket(). (Its ``socket`` property wraps the descriptor in a
    # socket.socket that closes it when collected: not used here.)
    if conn._closed:
        return None
    fd: int = conn._get_socket()
    return fd


def _no_socket(conn: Any) -> int | None:
    return None


def _pg8000_fd(conn: Any) -> int | None:
    # pg8000's close() sends Terminate, closes both and sets ``_sock`` (the buffered file
    # over the socket) to None; ``_usock`` is the socket itself.
    if conn._sock is None:
        return None
    fd: int = conn._usock.fileno()
    return fd if fd >= 0 else None


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
    Driver(
        "asyncpg",
        "asyncpg",
        ("asyncpg.connection.Connection",),
        _asyncpg_fd,
        dialects=("asyncpg",),
        constructors=("asyncpg.connection:Connection.__init__",),
    ),
    Driver(
        "aiomysql",
        "aiomysql",
        ("aiomysql.connection.Connection",),
        _aiomysql_fd,
        dialects=("aiomysql",),
        constructors=("aiomysql.connection:Connection.__init__",),
    ),
    Driver(
        "asyncmy",
        "asyncmy",
        ("asyncmy.connection.Connection",),
        _asyncmy_fd,
        dialects=("asyncmy",),
        constructors=("asyncmy.connection:Connection.__init__",),
    ),
    Driver(
        "mysql-connector",
        "mysql.connector",
        (
            "mysql.connector.connection.MySQLConnection",
            "mysql.connector.connection_cext.CMySQLConnection",
        ),
        _mysql_connector_fd,
        dialects=("mysqlconnector",),
        constructors=(
            "mysql.connector.connection:MySQLConnection.__init__",
            "mysql.connector.connection_cext:CMySQLConnection.__init__",
        ),
    ),
    Driver(
        "mariadb",
        "mariadb",
        ("mariadb.connections.Connection",),
        _mariadb_fd,
        dialects=("mariadbconnector",),
        constructors=("mariadb.connections:Connection.__init__",),
    ),
    Driver(
        "pg8000",
        "pg8000",
        ("pg8000.core.CoreConnection",),
        _pg8000_fd,
        dialects=("pg8000",),
        constructors=("pg8000.core:CoreConnection.__init__",),
    ),
    # SQLite has no socket: what a child must not do is close (or use) the parent's
    # connection to the same file. sqlite3.Connection cannot be referenced weakly, so only
    # engines protect it (their old pool is parked); its C class and C connect() are left
    # to Engine's instrumentation.
    Driver(
        "sqlite3",
        "sqlite3",
        ("sqlite3.Connection",),
        _no_socket,
        dialects=("pysqlite",),
        park=True,
    ),
    Driver(
        "aiosqlite",
        "aiosqlite",
        ("aiosqlite.core.Connection",),
        _no_socket,
        dialects=("aiosqlite",),
        constructors=("aiosqlite.core:Connection.__init__",),
        park=True,
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
    """Return the `Driver` that ``conn`` belongs to, or None if it is not a known one.

    Drivers added with `register_driver` are asked first, so a registration can also
    replace what forksafe ships for a driver.
    """
    cls = type(conn)
    try:
        return _BY_TYPE[cls]
    except KeyError:
        pass
    found = None
    for driver in all_drivers():
        if driver.matches(conn):
            found = driver
            break
    # a type's answer cannot change while the registrations do not (an object of a driver's
    # class exists only once that driver is loaded): the garbage-collector scan at fork
    # asks for every object, so it costs one dict lookup per type seen before
    if len(_BY_TYPE) < _BY_TYPE_MAX:
        _BY_TYPE[cls] = found
    return found


_BY_TYPE: dict[type, Driver | None] = {}
_BY_TYPE_MAX = 10_000


def all_drivers() -> tuple[Driver, ...]:
    """Every driver forksafe knows: the registered ones first, then the built-in `DRIVERS`."""
    return (*_REGISTERED, *DRIVERS)


def driver_for_dialect(dialect_driver: str) -> Driver | None:
    """The `Driver` behind a SQLAlchemy ``engine.dialect.driver`` name, if forksafe knows it."""
    for driver in all_drivers():
        if dialect_driver in driver.dialects:
            return driver
    return None


def dialect_drivers() -> frozenset[str]:
    """Every ``engine.dialect.driver`` name whose connections forksafe can protect."""
    return frozenset(name for driver in all_drivers() for name in driver.dialects)


def supported_names() -> str:
    """The supported drivers, for error messages."""
    return ", ".join(d.name for d in all_drivers())


# -- registration -------------------------------------------------------------------------
# Replaced as a whole (never mutated), so readers at fork time need no lock.
_REGISTERED: tuple[Driver, ...] = ()


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def register_driver(
    name: str,
    classes: Iterable[str | type],
    *,
    socket: Callable[[Any], int | _HasFileno],
    is_closed: Callable[[Any], bool],
    dialects: Iterable[str] = (),
    constructors: Iterable[str] = (),
) -> Driver:
    """Teach forksafe another DBAPI driver, so that `track`, `instrument` and engines
    protect its connections like the built-in ones.

    Args:
        name: the driver's name in messages and in `forksafe.connections`. Registering a
            name again replaces the earlier registration.
        classes: its connection classes, as classes or dotted paths (``"oracledb.Connection"``,
            looked up in ``sys.modules`` only: registering never imports the driver).
        socket: ``socket(conn)`` returns the open connection's socket: a ``socket.socket``,
            anything with ``fileno()``, or the descriptor number.
        is_closed: ``is_closed(conn)`` says whether the driver considers the connection
            closed (its ``closed`` flag, say). It must only read state: no round trip. It
            is asked first; ``socket`` is called only for an open connection, and any error
            or a negative descriptor is reported as an internal error (the connection stays
            unprotected and forksafe says so) instead of being taken for "closed".
        dialects: the ``engine.dialect.driver`` names of SQLAlchemy dialects built on the
            driver, so that `track` accepts their engines.
        constructors: ``"module:qualname"`` of what `forksafe.instrument` wraps to see each
            new connection: a class's ``__init__`` or a module-level ``connect`` function.

    Returns:
        The `Driver` now in use for those classes.
    """
    paths = tuple(c if isinstance(c, str) else f"{c.__module__}.{c.__qualname__}"
                  for c in classes)
    if not paths:
        raise ValueError(f"register_driver({name!r}) needs at least one connection class")

    def socket_fd(conn: Any) -> int | None:
        if is_closed(conn):
            return None
        found = socket(conn)
        fd = found if isinstance(found, int) else found.fileno()
        if fd < 0:
            raise RuntimeError(
                f"the {name} driver says this connection is open, but its socket {found!r} "
                "has no descriptor"
            )
        return fd

    driver = Driver(
        name,
        paths[0].split(".")[0],
        paths,
        socket_fd,
        dialects=tuple(dialects),
        constructors=tuple(constructors),
    )
    global _REGISTERED  # noqa: PLW0603 - one atomic rebinding
    _REGISTERED = (driver, *(d for d in _REGISTERED if d.name != name))
    _BY_TYPE.clear()
    return driver


def unregister_driver(name: str) -> bool:
    """Forget a driver added with `register_driver`; return whether there was one."""
    global _REGISTERED  # noqa: PLW0603 - one atomic rebinding
    kept = tuple(d for d in _REGISTERED if d.name != name)
    found = len(kept) != len(_REGISTERED)
    _REGISTERED = kept
    _BY_TYPE.clear()
    return found
