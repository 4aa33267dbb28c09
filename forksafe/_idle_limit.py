"""The server's idle limit, asked on a DBAPI connection (shared by the SQLAlchemy and Django
integrations; imports neither).

The probe leaves no trace on the connection: its transaction state afterwards is exactly
what it was before, whatever the autocommit mode and isolation level.

* MySQL/MariaDB: ``SELECT @@session.wait_timeout, @@max_allowed_packet`` reads no table, so
  it neither starts a transaction nor takes a snapshot (InnoDB takes a REPEATABLE READ
  snapshot at the first read of a table), in autocommit mode or not; a failed statement
  does not end or abort a transaction there. Nothing to undo.
* PostgreSQL: a query outside autocommit mode opens a transaction (and, under REPEATABLE
  READ or SERIALIZABLE, its snapshot), and a failed one leaves it aborted. So the probe
  runs only on an idle connection (the driver's transaction status, no round trip), and if
  it left the connection in a transaction or an aborted one it is rolled back. A
  connection the application has a transaction open on is not asked at all: rolling back
  the application's transaction, or aborting it with a failed probe, would be worse than
  not knowing the limit.
"""

from __future__ import annotations

from typing import Any

from forksafe import errors
from forksafe.drivers import unwrap

__all__ = [
    "DEFAULT_IDLE_CHECK",
    "PG_IN_TRANSACTION",
    "RETIRE_FRACTION",
    "pg_transaction_status",
    "rollback_if_opened",
    "server_idle_limit",
]

#: Seconds a connection may sit idle before it is checked before use (engines and Django).
DEFAULT_IDLE_CHECK = 10.0
#: Share of the server's idle limit after which an idle connection is replaced unchecked.
RETIRE_FRACTION = 0.9

# libpq's PGTransactionStatusType, as psycopg2 and psycopg 3 report it
# (``conn.info.transaction_status``): PQTRANS_IDLE is 0.
_PQTRANS_IDLE = 0
#: PQTRANS_ACTIVE, PQTRANS_INTRANS, PQTRANS_INERROR: a transaction is open.
PG_IN_TRANSACTION = frozenset({1, 2, 3})


def pg_transaction_status(dbapi_connection: Any) -> int | None:
    """libpq's transaction status of a psycopg2 / psycopg 3 connection, or None if unknown.

    Reads client-side state only (no round trip). Sees through SQLAlchemy's adapters.
    """
    for conn in (dbapi_connection, unwrap(dbapi_connection)):
        status = getattr(getattr(conn, "info", None), "transaction_status", None)
        if status is not None:
            return int(status)
    return None


def rollback_if_opened(dbapi_connection: Any, before: int | None) -> None:
    """Roll back the transaction a check opened (or aborted) on a PostgreSQL connection.

    ``before`` is `pg_transaction_status` taken before the check: only a connection that
    was idle then is rolled back, so an application's own transaction is never touched.
    """
    if before == _PQTRANS_IDLE and pg_transaction_status(dbapi_connection) != _PQTRANS_IDLE:
        dbapi_connection.rollback()


def _ask(dbapi_connection: Any, sql: str) -> Any:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        return cursor.fetchone()
    finally:
        cursor.close()


def server_idle_limit(backend: str, dbapi_connection: Any) -> float | None:
    """The server's idle limit for this session in seconds, or None if it has none.

    MySQL/MariaDB: ``@@session.wait_timeout`` (``max_allowed_packet`` comes in the same
    query and goes to `forksafe.errors.note_max_allowed_packet`, so that a statement too
    large is not mistaken for an idle timeout). PostgreSQL: ``idle_session_timeout`` (14+;
    0 means off), one round trip plus, outside autocommit mode, a rollback of the
    transaction the query opened. The connection's transaction state is left as it was
    (see the module docstring); on PostgreSQL a connection that is not idle (a transaction
    of the application's is open, or the driver's status is unknown) is not asked: None.

    Args:
        backend: ``"mysql"``, ``"mariadb"`` or ``"postgresql"`` (a SQLAlchemy dialect name
            or a Django vendor); any other answers None without a query.
        dbapi_connection: the driver's connection to ask on.

    Raises:
        Exception: whatever the driver raised for the query (the connection is left as
        it was found, a PostgreSQL transaction the query aborted is rolled back).
    """
    if backend in ("mysql", "mariadb"):
        row = _ask(dbapi_connection, "SELECT @@session.wait_timeout, @@max_allowed_packet")
        if row and len(row) > 1:
            errors.note_max_allowed_packet(row[1])
        scale = 1.0
    elif backend == "postgresql":
        if pg_transaction_status(dbapi_connection) != _PQTRANS_IDLE:
            return None
        try:
            row = _ask(
                dbapi_connection,
                "SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'",
            )
        finally:
            # Idle before, so a transaction now (open or aborted) is the probe's own.
            if pg_transaction_status(dbapi_connection) != _PQTRANS_IDLE:
                dbapi_connection.rollback()
        scale = 0.001  # pg_settings reports it in milliseconds
    else:
        return None
    if not row or row[0] is None:
        return None
    seconds = float(row[0]) * scale
    return seconds if seconds > 0 else None
