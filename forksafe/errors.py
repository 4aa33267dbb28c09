"""Explained errors: what a database error means, its likely cause, and the fix.

"MySQL server has gone away" has half a dozen causes (an idle connection outlived the
server's ``wait_timeout``, a restart, a killed session, a network cut, a packet over
``max_allowed_packet``, a socket shared across ``fork()``) and the driver's message names
none of them. `classify` maps an exception (or just its message) to an `ErrorClass` that
does: pure logic, no I/O. The error code (MySQL) or SQLSTATE (PostgreSQL) decides when the
error has one; the message text decides only for an error that carries no code (a duplicate
key whose *data* says "Connection refused" is not a disconnect; nor is a SQLite error, which
carries SQLite's code) and is not one of PEP 249's errors about the statement
(``IntegrityError``, ``DataError``, ``ProgrammingError``, ``NotSupportedError``: a trigger
that raises "Connection refused: account locked" is the application's). An error raised while
another was being handled is judged on its own, never by that earlier error.

A statement larger than the server's ``max_allowed_packet`` also ends in "server has gone
away": when the size of the failed statement is known (SQLAlchemy's error carries it) and
the server's limit was learned (`note_max_allowed_packet`, called where forksafe learns the
idle limit), it is classified as `PACKET_TOO_LARGE`, which is never worth retrying.

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

import contextlib
import logging
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from forksafe._state import ForkLock

__all__ = [
    "ErrorClass",
    "classify",
    "explain",
    "is_disconnect",
    "learned_max_allowed_packet",
    "mark_inherited",
    "mask_secrets",
    "note_max_allowed_packet",
    "report",
    "reset_reported",
    "statement_size",
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
            or garbled (the answers already read may be wrong, so repeating hides a bug) and
            where repeating cannot help (a statement over ``max_allowed_packet``).
        django_fix: the fix for a Django project, when it differs from ``fix``.
    """

    code: str
    name: str
    cause: str
    fix: str
    disconnect: bool = True
    retry_safe: bool = True
    django_fix: str = ""

    def explain(self, detail: str = "") -> str:
        """One line: the error, its likely cause and the fix (``detail``: a masked message).

        The fix fits the framework in use: a Django project is told about forksafe.django,
        not about tracking engines.
        """
        shown = f" ({detail})" if detail else ""
        return f"{self.name}{shown}. Likely cause: {self.cause} Fix: {self.fix_here()}"

    def fix_here(self) -> str:
        """The fix for this process: `django_fix` when Django is in use, else `fix`."""
        installed = _forksafe_django_installed()
        if self.django_fix and installed is not None:
            if installed:
                return self.django_fix
            return "add 'forksafe.django' to INSTALLED_APPS, then: " + self.django_fix
        return self.fix


def _forksafe_django_installed() -> bool | None:
    """None outside a Django project (settings not configured); else whether
    'forksafe.django' is in INSTALLED_APPS."""
    conf = sys.modules.get("django.conf")
    if conf is None:
        return None
    try:
        if not conf.settings.configured:
            return None
        apps = [str(app) for app in conf.settings.INSTALLED_APPS]
    except Exception:  # a half-imported or broken Django: give the generic advice
        return None
    return any(app == "forksafe.django" or app.startswith("forksafe.django.") for app in apps)


_IDLE = (
    "the connection sat idle longer than the server's idle limit (MySQL/MariaDB "
    "wait_timeout, PostgreSQL idle_session_timeout) and the server closed it; or the server "
    "restarted, the session was killed, or the network dropped it."
)
_IDLE_FIX = (
    "forksafe.track(engine) checks idle connections before handing them out and retires them "
    "before the server's limit (learned on connect); wrap work that is safe to repeat in "
    "@forksafe.retry_on_disconnect."
)
_IDLE_FIX_DJANGO = (
    "wrap each job of a worker that serves no HTTP (a consumer, a command) in "
    "forksafe.django.unit_of_work(), and work that is safe to repeat in "
    "@forksafe.django.retry_on_disconnect around transaction.atomic()."
)
_SHARED = (
    "two processes (or threads) used one connection at once, almost always a connection "
    "opened before fork() (uWSGI without lazy-apps, gunicorn preload_app, multiprocessing) "
    "and inherited by every worker."
)
_SHARED_FIX = (
    "forksafe.track(engine) before the fork (and 'import = forksafe.uwsgi' under uWSGI) so "
    "each worker opens its own connection; never share one connection between threads."
)
_SHARED_FIX_DJANGO = (
    "with 'forksafe.django' in INSTALLED_APPS every worker opens its own connections (under "
    "uWSGI also 'import = forksafe.uwsgi'); never share one connection between threads."
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
    django_fix=_IDLE_FIX_DJANGO,
)
LOST_DURING_QUERY = ErrorClass(
    "mysql-2013",
    "Lost connection to MySQL server during query (2013)",
    "the server or the network dropped the connection mid-statement: a restart, a KILL, a "
    "network cut, a query over net_read/write_timeout; or (after a fork) another process "
    "closed or used the shared connection.",
    _IDLE_FIX,
    django_fix=_IDLE_FIX_DJANGO,
)
LOST_EXTENDED = ErrorClass(
    "mysql-2055",
    "Lost connection to MySQL server, system error (2055)",
    "the socket failed under the client (reset by peer, broken pipe): a restart, a KILL, a "
    "network cut, or a socket inherited across fork() and closed by another process.",
    _IDLE_FIX,
    django_fix=_IDLE_FIX_DJANGO,
)
OUT_OF_SYNC = ErrorClass(
    "mysql-2014",
    "Commands out of sync (2014)",
    _SHARED + " Less often: a result set was not fully read before the next query.",
    _SHARED_FIX,
    retry_safe=False,
    django_fix=_SHARED_FIX_DJANGO,
)
MALFORMED = ErrorClass(
    "mysql-protocol",
    "Malformed packet / packet sequence number wrong",
    _SHARED,
    _SHARED_FIX,
    retry_safe=False,
    django_fix=_SHARED_FIX_DJANGO,
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
    django_fix=_IDLE_FIX_DJANGO,
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
    django_fix=_SHARED_FIX_DJANGO,
)
PG_SSL_EOF = ErrorClass(
    "pg-ssl-eof",
    "SSL SYSCALL error: EOF detected",
    "the TLS connection ended under the client: a socket inherited across fork() and closed "
    "by another process, a server restart or pg_terminate_backend(), or a network cut.",
    _SHARED_FIX + " If no fork is involved: " + _IDLE_FIX,
    django_fix=_IDLE_FIX_DJANGO,
)
PG_CLOSED = ErrorClass(
    "pg-closed",
    "server closed the connection unexpectedly",
    "the server ended the session: a restart, pg_terminate_backend(), "
    "idle_session_timeout / idle_in_transaction_session_timeout, a network cut; or (after "
    "a fork) another process closed the shared connection.",
    _IDLE_FIX,
    django_fix=_IDLE_FIX_DJANGO,
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
    django_fix=_IDLE_FIX_DJANGO,
)
PGBOUNCER_CLIENT_IDLE = ErrorClass(
    "pgbouncer-client-idle-timeout",
    "client_idle_timeout (PgBouncer closed the connection)",
    "the connection sat idle longer than PgBouncer's client_idle_timeout: the pooler between "
    "the app and PostgreSQL closed it (recycle='auto' learns PostgreSQL's limit, not the "
    "pooler's).",
    "forksafe.track(engine, recycle=<a little less than client_idle_timeout>); "
    "`forksafe doctor --url` reads PgBouncer's settings and prints the value.",
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
    django_fix=_SHARED_FIX_DJANGO,
)
RESULT_CLOSED = ErrorClass(
    "sa-result-closed",
    "This result object does not return rows (ResourceClosedError)",
    "a SELECT got another statement's reply: " + _SHARED,
    _SHARED_FIX,
    disconnect=False,
    retry_safe=False,
    django_fix=_SHARED_FIX_DJANGO,
)
NO_SUCH_COLUMN = ErrorClass(
    "sa-no-such-column",
    "Could not locate column in row (NoSuchColumnError)",
    "a query got the rows of a different query: " + _SHARED,
    _SHARED_FIX,
    disconnect=False,
    retry_safe=False,
    django_fix=_SHARED_FIX_DJANGO,
)
NO_RESULT_METADATA = ErrorClass(
    "sa-no-result-metadata",
    "NotImplementedError from SQLAlchemy's _indexes_for_keys (a result without columns)",
    "the ORM read a reply that has no columns, another statement's reply: " + _SHARED
    + " (SQLAlchemy 2.x raises this where 1.x raised NoSuchColumnError.)",
    _SHARED_FIX,
    disconnect=False,
    retry_safe=False,
    django_fix=_SHARED_FIX_DJANGO,
)
INHERITED = ErrorClass(
    "forksafe-inherited",
    "Connection inherited from the parent process",
    "this connection was open in the parent when the process forked (checked out by a "
    "Session or Connection that was kept open across the fork, or used directly); forksafe "
    "closed the child's copy of its socket, so that nothing the child does reaches the "
    "parent's session.",
    "end the Sessions and Connections used at start-up before the fork (session.close(), "
    "scoped_session.remove(), or a with block); in the child, discard an inherited one "
    "(roll it back, close or remove it) and use a new one: the engine gives the child "
    "connections of its own.",
)

PACKET_TOO_LARGE = ErrorClass(
    "mysql-packet-too-large",
    "Statement larger than the server's max_allowed_packet",
    "the statement (with its data) is bigger than the server's max_allowed_packet, so the "
    "server refused it and closed the connection (1153, or 2006 'server has gone away' when "
    "the client was still sending). Sending it again fails the same way.",
    "send the data in smaller pieces (several INSERTs, or chunks of a large value), or raise "
    "max_allowed_packet on the server (SET GLOBAL max_allowed_packet = ... and in its config "
    "file) above the largest statement you send; do not retry it.",
    retry_safe=False,
)
PYMYSQL_CLOSED = ErrorClass(
    "pymysql-closed",
    "PyMySQL InterfaceError (0, '') (connection closed)",
    "the connection was closed (by an earlier error, the server, or forksafe after a fork) "
    "and is still being used.",
    _IDLE_FIX,
    django_fix=_IDLE_FIX_DJANGO,
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
    1153: PACKET_TOO_LARGE,
    4031: INACTIVITY,
}
# A statement over max_allowed_packet ends in one of these, as the client sees it.
_PACKET_SYMPTOMS = frozenset({"mysql-2006", "mysql-2013", "mysql-2055"})

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
    ("client_idle_timeout", PGBOUNCER_CLIENT_IDLE),
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
    ("got a packet bigger than", PACKET_TOO_LARGE),
    ("this result object does not return rows", RESULT_CLOSED),
    ("could not locate column in row", NO_SUCH_COLUMN),
)

_SA_CLASSES: dict[str, ErrorClass] = {
    "ResourceClosedError": RESULT_CLOSED,
    "NoSuchColumnError": NO_SUCH_COLUMN,
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the DBAPI error SQLAlchemy wrapped in it (``.orig``) and the errors it was
    raised from (``__cause__``: Django's and SQLAlchemy's wrappers set it); bounded, no loops.

    Never ``__context__``: an error raised while another was being handled (an
    IntegrityError inside ``except OperationalError:``) is not the earlier error.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 8:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        for nxt in (getattr(cur, "orig", None), cur.__cause__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _mysql_code(exc: BaseException) -> int | None:
    """The MySQL error number of a driver error (0, PyMySQL's "no code", is None)."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool) and args[0]:
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


def _by_type(exc: BaseException) -> ErrorClass | None:
    """SQLAlchemy's fork symptoms, known by their class or by where they were raised."""
    for cls in type(exc).__mro__:
        kind = _SA_CLASSES.get(cls.__name__)
        if kind is not None and cls.__module__.startswith("sqlalchemy"):
            return kind
    if type(exc) is NotImplementedError and _raised_in(exc, "sqlalchemy", "_indexes_for_keys"):
        return NO_RESULT_METADATA
    return None


def _raised_in(exc: BaseException, package: str, function: str) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is ``function`` of ``package``."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    module = str(frame.f_globals.get("__name__", ""))
    return module.partition(".")[0] == package and frame.f_code.co_name == function


# "(2006, 'MySQL server has gone away')" at the start of a driver message, or inside
# SQLAlchemy's "(MySQLdb.OperationalError) (2006, ...)" or a log line.
_MYSQL_CODE_IN_TEXT = re.compile(r"(?:^|\()\s*(\d{4})\s*,")


def classify(
    exc_or_message: BaseException | str,
    *,
    statement_size: int | None = None,
    max_allowed_packet: int | None = None,
) -> ErrorClass | None:
    """Explain a database error; None if it is not one forksafe knows.

    Looks through SQLAlchemy's wrapper (``.orig``) and the errors it was raised from
    (``__cause__``), never through an error that was merely being handled when it was raised
    (``__context__``). A MySQL error code or PostgreSQL SQLSTATE decides; the message text
    only decides for an error without one (a connection-class SQLSTATE, ``08...``, counts as
    none: the text then says which).

    Args:
        exc_or_message: an exception (driver, SQLAlchemy or Django), or an error message
            such as a log line.
        statement_size: bytes of the statement that failed, if the caller knows it
            (SQLAlchemy's errors carry their statement, so it is worked out for them).
        max_allowed_packet: the server's ``max_allowed_packet``; default: the smallest one
            learned in this process (`note_max_allowed_packet`).

    Returns:
        The `ErrorClass`, or None for errors that are not about the connection itself.
    """
    kind = _classify(exc_or_message)
    if kind is None or kind.code not in _PACKET_SYMPTOMS:
        return kind
    size = statement_size
    if size is None and not isinstance(exc_or_message, str):
        size = statement_size_of(exc_or_message)
    limit = max_allowed_packet if max_allowed_packet is not None else _MAX_PACKET[0]
    if size is not None and limit is not None and size >= limit:
        return PACKET_TOO_LARGE
    return kind


# Errors raised by a connection forksafe neutralised in this process (`mark_inherited`).
_INHERITED_ERRORS: weakref.WeakSet[BaseException] = weakref.WeakSet()


def mark_inherited(exc: BaseException) -> None:
    """Note that ``exc`` was raised by a connection inherited across fork and neutralised
    by forksafe (the SQLAlchemy adapter knows which connection failed; the error does
    not), so that `classify` names that cause instead of an idle timeout."""
    with contextlib.suppress(TypeError):  # not weak-referenceable: explained as before
        _INHERITED_ERRORS.add(exc)


def _classify(exc_or_message: BaseException | str) -> ErrorClass | None:
    if not isinstance(exc_or_message, str) and _INHERITED_ERRORS:
        for exc in _chain(exc_or_message):
            if exc in _INHERITED_ERRORS:
                return INHERITED
    if isinstance(exc_or_message, str):
        code_match = _MYSQL_CODE_IN_TEXT.search(exc_or_message)
        if code_match is not None:  # the code decides, known or not
            return _MYSQL_CODES.get(int(code_match.group(1)))
        return _by_message(exc_or_message)
    chain = list(_chain(exc_or_message))
    for exc in chain:
        kind = _by_type(exc)
        if kind is not None:
            return kind
    kind, coded = _by_code(chain)
    if kind is not None or coded:
        return kind
    return _by_text(chain)


def _by_code(chain: list[BaseException]) -> tuple[ErrorClass | None, bool]:
    """The class the first known code in ``chain`` names; and whether any error had a code."""
    coded = False
    for exc in chain:
        code = _mysql_code(exc)
        if code is not None:
            if code in _MYSQL_CODES:
                return _MYSQL_CODES[code], True
            coded = True
        if isinstance(getattr(exc, "sqlite_errorcode", None), int):
            coded = True  # SQLite (Python 3.11+): no server, nothing to disconnect from
        state = _sqlstate(exc)
        if state is not None:
            if state in _SQLSTATES:
                return _SQLSTATES[state], True
            if not state.startswith("08"):  # class 08, "connection exception": text decides
                coded = True
    return None, coded


# PEP 249's errors about the statement or its data, never about the connection: their text is
# the application's (a trigger's RAISE, a CHECK constraint's name), whatever words it has.
_STATEMENT_ERRORS = frozenset({"IntegrityError", "DataError", "ProgrammingError",
                               "NotSupportedError"})


def _statement_error(exc: BaseException) -> bool:
    return any(cls.__name__ in _STATEMENT_ERRORS for cls in type(exc).__mro__)


def _by_text(chain: list[BaseException]) -> ErrorClass | None:
    """For errors without a code: the message text, and PyMySQL's InterfaceError(0, '')."""
    for exc in chain:
        if isinstance(getattr(exc, "orig", None), BaseException):
            continue  # a wrapper's text repeats the wrapped error's: judge that one
        if _statement_error(exc):
            continue
        kind = _by_message(str(exc))
        if kind is not None:
            return kind
    for exc in chain:
        if (
            type(exc).__name__ == "InterfaceError"
            and type(exc).__module__.startswith("pymysql")
            and getattr(exc, "args", (None,))[:1] == (0,)
        ):
            return PYMYSQL_CLOSED
    return None


# -- packet size --------------------------------------------------------------------------------
# The smallest max_allowed_packet learned from a server in this process (a list: no global).
_MAX_PACKET: list[int | None] = [None]


def note_max_allowed_packet(value: object) -> None:
    """Remember a server's ``max_allowed_packet`` (bytes), as learned on a new connection.

    Called where forksafe asks a new connection its idle limit; keeps the smallest value
    seen, so that `classify` can tell a statement that was too large from an idle timeout.
    """
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return
    if number > 0 and (_MAX_PACKET[0] is None or number < _MAX_PACKET[0]):
        _MAX_PACKET[0] = number


def learned_max_allowed_packet() -> int | None:
    """The smallest ``max_allowed_packet`` learned in this process, or None."""
    return _MAX_PACKET[0]


def statement_size(statement: object, parameters: object = None) -> int:
    """About how many bytes a statement and its parameters take on the wire."""
    return _size(statement) + _size(parameters)


def _size(value: object, depth: int = 0) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        size = len(value)
    elif isinstance(value, str):
        size = len(value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, dict) and depth < 4:
        size = sum(_size(v, depth + 1) for v in value.values())
    elif isinstance(value, (list, tuple)) and depth < 4:
        size = sum(_size(v, depth + 1) for v in value)
    else:
        size = 0 if value is None else 8
    return size


def statement_size_of(exc: BaseException) -> int | None:
    """The size of the statement an error failed on, when the error carries it
    (SQLAlchemy's ``StatementError``: ``.statement`` and ``.params``)."""
    for cur in _chain(exc):
        statement = getattr(cur, "statement", None)
        if isinstance(statement, str):
            return statement_size(statement, getattr(cur, "params", None))
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


def explain(
    exc_or_message: BaseException | str,
    *,
    statement_size: int | None = None,
    max_allowed_packet: int | None = None,
) -> str | None:
    """The explanation of an error as one password-free line, or None if it is not a known one.

    Returns the text (it prints nothing): ``print(forksafe.errors.explain(exc))``. Arguments
    as for `classify`.
    """
    kind = classify(exc_or_message, statement_size=statement_size,
                    max_allowed_packet=max_allowed_packet)
    if kind is None:
        return None
    return kind.explain(_detail(exc_or_message, kind, statement_size, max_allowed_packet))


def _detail(exc_or_message: BaseException | str, kind: ErrorClass | None = None,
            size: int | None = None, limit: int | None = None) -> str:
    text = exc_or_message if isinstance(exc_or_message, str) else _innermost_message(
        exc_or_message
    )
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:197] + "..."
    if kind is PACKET_TOO_LARGE:
        if size is None and not isinstance(exc_or_message, str):
            size = statement_size_of(exc_or_message)
        limit = limit if limit is not None else _MAX_PACKET[0]
        if size is not None:
            text += f"; the statement was about {size:,} bytes"
        if limit is not None:
            text += f", the server's max_allowed_packet is {limit:,} bytes"
    return mask_secrets(text)


def _innermost_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        exc = orig
    return f"{type(exc).__name__}: {exc}"


_REPORTED: set[str] = set()
_REPORTED_LOCK = ForkLock("error report")


def report(exc: BaseException, where: str = "", level: int = logging.WARNING) -> ErrorClass | None:
    """Log the explanation of ``exc`` once per cause in this process; return its class.

    The first time a cause is seen the line carries the full explanation; later ones go to
    DEBUG as one short line.

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
    prefix = f"{where}: " if where else ""
    with _REPORTED_LOCK:
        seen = kind.code in _REPORTED
        _REPORTED.add(kind.code)
    if seen:
        logger.debug("%s%s again: %s", prefix, kind.name, _detail(exc))
        return kind
    logger.log(
        level,
        "%s%s (logged once per process for this cause)",
        prefix,
        kind.explain(_detail(exc, kind)),
    )
    return kind


def reset_reported() -> None:
    """Forget which causes were already logged (after a fork, and for tests)."""
    with _REPORTED_LOCK:
        _REPORTED.clear()
