"""Explained errors: what a database error means, its likely cause, and the fix.

"MySQL server has gone away" has half a dozen causes (an idle connection outlived the
server's ``wait_timeout``, a restart, a killed session, a network cut, a packet over
``max_allowed_packet``, a socket shared across ``fork()``) and the driver's message names
none of them. `classify` maps an exception (or just its message) to an `ErrorClass` that
does, using only the error code, the SQLSTATE and the message text: pure logic, no I/O.

`report` logs the explanation on the ``forksafe`` logger **once per cause** in a process
(a dead server would otherwise log the same paragraph for every request), and never a
password: driver messages are passed through `mask_secrets` first.

Example::

    try:
        ...
    except Exception as exc:
        kind = forksafe.errors.classify(exc)
        if kind is not None and kind.disconnect:
            ...  # the connection is gone; a new one will work once the server is back
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "ErrorClass",
    "classify",
    "explain",
    "is_disconnect",
    "mask_secrets",
    "report",
    "reset_reported",
]

logger = logging.getLogger("forksafe")


@dataclass(frozen=True)
class ErrorClass:
    """One kind of database failure, explained.

    Attributes:
        code: a short stable identifier, e.g. ``"mysql-2006"`` or ``"pg-ssl-bad-mac"``.
        name: the error as users see it, e.g. ``"MySQL server has gone away"``.
        cause: the likely causes, most likely first.
        fix: what to do about it.
        disconnect: the connection is unusable; the pool must drop it (and a new one works
            once the server is reachable).
        retry_safe: a unit of work that failed with this error (before its COMMIT) may be
            re-run on a new connection. False where the error means the session was shared
            or garbled: the answers already read may be wrong, so repeating hides a bug.
    """

    code: str
    name: str
    cause: str
    fix: str
    disconnect: bool = True
    retry_safe: bool = True

    def explain(self, detail: str = "") -> str:
        """One line: the error, its likely cause and the fix (``detail``: a masked message)."""
        shown = f" ({detail})" if detail else ""
        return f"{self.name}{shown}. Likely cause: {self.cause} Fix: {self.fix}"


_IDLE = (
    "the connection sat idle longer than the server's idle limit (MySQL/MariaDB "
    "wait_timeout, PostgreSQL idle_session_timeout) and the server closed it; or the server "
    "restarted, the session was killed, or the network dropped it."
)
_IDLE_FIX = (
    "forksafe.track(engine) checks idle connections before handing them out and retires them "
    "before the server's limit (learned on connect); for Django use forksafe.django and "
    "forksafe.django.unit_of_work() around each job of a non-HTTP worker; wrap work that is "
    "safe to repeat in @forksafe.retry_on_disconnect."
)
_SHARED = (
    "two processes (or threads) used one connection at once, almost always a connection "
    "opened before fork() (uWSGI without lazy-apps, gunicorn preload_app, multiprocessing) "
    "and inherited by every worker."
)
_SHARED_FIX = (
    "forksafe.track(engine) before the fork (and 'import = forksafe.uwsgi' under uWSGI, or "
    "'forksafe.django' in INSTALLED_APPS) so each worker opens its own connection; never "
    "share one connection between threads."
)
_DOWN = "the server is down, restarting, or not reachable at that address."
_DOWN_FIX = (
    "check the server is up and the host/port are right; @forksafe.retry_on_disconnect "
    "waits (with bounded backoff) for a restart to finish."
)

GONE_AWAY = ErrorClass(
    "mysql-2006",
    "MySQL server has gone away (2006)",
    _IDLE + " Less often: a statement larger than max_allowed_packet, or (after a fork) "
    "another process closed the shared connection.",
    _IDLE_FIX,
)
LOST_DURING_QUERY = ErrorClass(
    "mysql-2013",
    "Lost connection to MySQL server during query (2013)",
    "the server or the network dropped the connection mid-statement: a restart, a KILL, a "
    "network cut, a query over net_read/write_timeout; or (after a fork) another process "
    "closed or used the shared connection.",
    _IDLE_FIX,
)
LOST_EXTENDED = ErrorClass(
    "mysql-2055",
    "Lost connection to MySQL server, system error (2055)",
    "the socket failed under the client (reset by peer, broken pipe): a restart, a KILL, a "
    "network cut, or a socket inherited across fork() and closed by another process.",
    _IDLE_FIX,
)
OUT_OF_SYNC = ErrorClass(
    "mysql-2014",
    "Commands out of sync (2014)",
    _SHARED + " Less often: a result set was not fully read before the next query.",
    _SHARED_FIX,
    retry_safe=False,
)
MALFORMED = ErrorClass(
    "mysql-protocol",
    "Malformed packet / packet sequence number wrong",
    _SHARED,
    _SHARED_FIX,
    retry_safe=False,
)
KILLED = ErrorClass(
    "mysql-killed",
    "Connection was killed (1927)",
    "someone ran KILL CONNECTION on this session (an admin, a watchdog, a failover tool), "
    "or the server is shutting down.",
    "nothing to fix in the app if it was deliberate; @forksafe.retry_on_disconnect re-runs "
    "work that is safe to repeat.",
)
SHUTDOWN = ErrorClass(
    "mysql-shutdown",
    "Server shutdown in progress (1053)",
    "the server is stopping (a restart or a failover).",
    _DOWN_FIX,
)
INACTIVITY = ErrorClass(
    "mysql-4031",
    "Disconnected by the server because of inactivity (4031)",
    "the connection sat idle longer than the server's wait_timeout.",
    _IDLE_FIX,
)
CANT_CONNECT = ErrorClass(
    "cant-connect",
    "Cannot connect to the database server",
    _DOWN,
    _DOWN_FIX,
)
PG_BAD_MAC = ErrorClass(
    "pg-ssl-bad-mac",
    "SSL error: decryption failed or bad record mac",
    "two processes used one TLS connection: the encryption state of a connection opened "
    "before fork() was copied into every worker. " + _SHARED,
    _SHARED_FIX,
    retry_safe=False,
)
PG_SSL_EOF = ErrorClass(
    "pg-ssl-eof",
    "SSL SYSCALL error: EOF detected",
    "the TLS connection ended under the client: a socket inherited across fork() and closed "
    "by another process, a server restart or pg_terminate_backend(), or a network cut.",
    _SHARED_FIX + " If no fork is involved: " + _IDLE_FIX,
)
PG_CLOSED = ErrorClass(
    "pg-closed",
    "server closed the connection unexpectedly",
    "the server ended the session: a restart, pg_terminate_backend(), "
    "idle_session_timeout / idle_in_transaction_session_timeout, a network cut; or (after "
    "a fork) another process closed the shared connection.",
    _IDLE_FIX,
)
PG_TERMINATED = ErrorClass(
    "pg-terminated",
    "terminating connection due to administrator command (57P01)",
    "pg_terminate_backend() on this session, or the server is shutting down.",
    "nothing to fix in the app if it was deliberate; @forksafe.retry_on_disconnect re-runs "
    "work that is safe to repeat.",
)
PG_IDLE_TIMEOUT = ErrorClass(
    "pg-idle-timeout",
    "terminating connection due to idle-session timeout (57P05)",
    "the connection sat idle longer than the server's idle_session_timeout.",
    _IDLE_FIX,
)
PG_ALREADY_CLOSED = ErrorClass(
    "pg-already-closed",
    "connection already closed",
    "the connection was closed earlier (by an error, or by forksafe after a fork) and is "
    "still being used.",
    "open a new connection: with a pool, return the dead one and check out another; "
    "forksafe.track(engine) does that for you after a fork.",
)
PG_DESYNC = ErrorClass(
    "pg-desync",
    "lost synchronization with server",
    _SHARED,
    _SHARED_FIX,
    retry_safe=False,
)
RESULT_CLOSED = ErrorClass(
    "sa-result-closed",
    "This result object does not return rows (ResourceClosedError)",
    "a SELECT got another statement's reply: " + _SHARED,
    _SHARED_FIX,
    disconnect=False,
    retry_safe=False,
)
NO_SUCH_COLUMN = ErrorClass(
    "sa-no-such-column",
    "Could not locate column in row (NoSuchColumnError)",
    "a query got the rows of a different query: " + _SHARED,
    _SHARED_FIX,
    disconnect=False,
    retry_safe=False,
)
PYMYSQL_CLOSED = ErrorClass(
    "pymysql-closed",
    "PyMySQL InterfaceError (0, '') (connection closed)",
    "the connection was closed (by an earlier error, the server, or forksafe after a fork) "
    "and is still being used.",
    _IDLE_FIX,
)

_MYSQL_CODES: dict[int, ErrorClass] = {
    2002: CANT_CONNECT,
    2003: CANT_CONNECT,
    2006: GONE_AWAY,
    2013: LOST_DURING_QUERY,
    2014: OUT_OF_SYNC,
    2027: MALFORMED,
    2055: LOST_EXTENDED,
    1927: KILLED,
    1053: SHUTDOWN,
    4031: INACTIVITY,
}

_SQLSTATES: dict[str, ErrorClass] = {
    "57P01": PG_TERMINATED,
    "57P02": PG_TERMINATED,
    "57P05": PG_IDLE_TIMEOUT,
    "57P03": CANT_CONNECT,
}

# Message patterns, most specific first (lower-case substrings).
_MESSAGES: tuple[tuple[str, ErrorClass], ...] = (
    ("decryption failed or bad record mac", PG_BAD_MAC),
    ("ssl syscall error: eof detected", PG_SSL_EOF),
    ("unexpected eof while reading", PG_SSL_EOF),
    ("eof detected", PG_SSL_EOF),
    ("lost synchronization with server", PG_DESYNC),
    ("idle-session timeout", PG_IDLE_TIMEOUT),
    ("terminating connection due to administrator command", PG_TERMINATED),
    ("server closed the connection unexpectedly", PG_CLOSED),
    ("could not receive data from server", PG_CLOSED),
    ("could not send data to server", PG_CLOSED),
    ("no connection to the server", PG_CLOSED),
    ("connection already closed", PG_ALREADY_CLOSED),
    ("the connection is closed", PG_ALREADY_CLOSED),
    ("the database system is shutting down", CANT_CONNECT),
    ("the database system is starting up", CANT_CONNECT),
    ("connection refused", CANT_CONNECT),
    ("mysql server has gone away", GONE_AWAY),
    ("lost connection to mysql server", LOST_DURING_QUERY),
    ("lost connection to server", LOST_DURING_QUERY),
    ("commands out of sync", OUT_OF_SYNC),
    ("packet sequence number wrong", MALFORMED),
    ("malformed packet", MALFORMED),
    ("connection was killed", KILLED),
    ("server shutdown in progress", SHUTDOWN),
    ("can't connect to", CANT_CONNECT),
    ("this result object does not return rows", RESULT_CLOSED),
    ("could not locate column in row", NO_SUCH_COLUMN),
)

_SA_CLASSES: dict[str, ErrorClass] = {
    "ResourceClosedError": RESULT_CLOSED,
    "NoSuchColumnError": NO_SUCH_COLUMN,
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the DBAPI error SQLAlchemy wrapped in it, and its causes (bounded, no loops)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 8:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        for nxt in (getattr(cur, "orig", None), cur.__cause__, cur.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _mysql_code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def _sqlstate(exc: BaseException) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def _by_message(message: str) -> ErrorClass | None:
    low = message.lower()
    for needle, kind in _MESSAGES:
        if needle in low:
            return kind
    return None


def _classify_one(exc: BaseException) -> ErrorClass | None:
    for cls in type(exc).__mro__:
        kind = _SA_CLASSES.get(cls.__name__)
        if kind is not None and cls.__module__.startswith("sqlalchemy"):
            return kind
    code = _mysql_code(exc)
    if code is not None and code in _MYSQL_CODES:
        return _MYSQL_CODES[code]
    state = _sqlstate(exc)
    if state is not None and state in _SQLSTATES:
        return _SQLSTATES[state]
    by_text = _by_message(str(exc))
    if by_text is not None:
        return by_text
    if (
        code == 0
        and type(exc).__name__ == "InterfaceError"
        and type(exc).__module__.startswith("pymysql")
    ):
        return PYMYSQL_CLOSED
    return None


_MYSQL_CODE_IN_TEXT = re.compile(r"(?:^|\()\s*(\d{4})\s*,")


def classify(exc_or_message: BaseException | str) -> ErrorClass | None:
    """Explain a database error; None if it is not one forksafe knows.

    Looks through SQLAlchemy's wrapper (``.orig``) and the exception's causes; a MySQL error
    code or PostgreSQL SQLSTATE wins over the message text.

    Args:
        exc_or_message: an exception (driver, SQLAlchemy or Django), or an error message
            such as a log line.

    Returns:
        The `ErrorClass`, or None for errors that are not about the connection itself.
    """
    if isinstance(exc_or_message, str):
        # "(2006, 'MySQL server has gone away')" at the start of a driver message, or inside
        # SQLAlchemy's "(MySQLdb.OperationalError) (2006, ...)" or a log line.
        for code_match in _MYSQL_CODE_IN_TEXT.finditer(exc_or_message):
            code = int(code_match.group(1))
            if code in _MYSQL_CODES:
                return _MYSQL_CODES[code]
        return _by_message(exc_or_message)
    for exc in _chain(exc_or_message):
        kind = _classify_one(exc)
        if kind is not None:
            return kind
    return None


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection is gone (a new one may work)."""
    kind = classify(exc)
    return kind is not None and kind.disconnect


_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # scheme://user:password@host
    (re.compile(r"(?P<pre>[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s]*(?=@)"), r"\g<pre>***"),
    # password=secret, passwd: 'secret', PWD=secret (DSNs, kwargs reprs, libpq strings)
    (
        re.compile(
            r"(?P<key>\b(?:password|passwd|pwd)\b['\"]?\s*[=:]\s*)(?:'[^']*'|\"[^\"]*\"|[^\s,;)}]+)",
            re.IGNORECASE,
        ),
        r"\g<key>***",
    ),
)


def mask_secrets(text: str) -> str:
    """``text`` with passwords in URLs and ``password=`` pairs replaced by ``***``."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def explain(exc_or_message: BaseException | str) -> str | None:
    """One password-free line explaining the error, or None if it is not a known one."""
    kind = classify(exc_or_message)
    if kind is None:
        return None
    return kind.explain(_detail(exc_or_message))


def _detail(exc_or_message: BaseException | str) -> str:
    text = exc_or_message if isinstance(exc_or_message, str) else _innermost_message(
        exc_or_message
    )
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:197] + "..."
    return mask_secrets(text)


def _innermost_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        exc = orig
    return f"{type(exc).__name__}: {exc}"


_REPORTED: set[str] = set()
_REPORTED_LOCK = threading.Lock()


def report(exc: BaseException, where: str = "", level: int = logging.WARNING) -> ErrorClass | None:
    """Log the explanation of ``exc`` once per cause in this process; return its class.

    Args:
        exc: the error.
        where: a password-free description of the engine or alias, for the log line.
        level: the logging level of the first report.

    Returns:
        The `ErrorClass`, or None if the error is not one forksafe knows (nothing logged).
    """
    kind = classify(exc)
    if kind is None:
        return None
    with _REPORTED_LOCK:
        if kind.code in _REPORTED:
            return kind
        _REPORTED.add(kind.code)
    prefix = f"forksafe: {where}: " if where else "forksafe: "
    logger.log(
        level,
        "%s%s (logged once per process for this cause)",
        prefix,
        kind.explain(_detail(exc)),
    )
    return kind


def reset_reported() -> None:
    """Forget which causes were already logged (after a fork, and for tests)."""
    with _REPORTED_LOCK:
        _REPORTED.clear()
