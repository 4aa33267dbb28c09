"""The server's idle limit, asked on a DBAPI connection (shared by the SQLAlchemy and Django
integrations; imports neither).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_IDLE_CHECK", "RETIRE_FRACTION", "server_idle_limit"]

#: Seconds a connection may sit idle before it is checked before use (engines and Django).
DEFAULT_IDLE_CHECK = 10.0
#: Share of the server's idle limit after which an idle connection is replaced unchecked.
RETIRE_FRACTION = 0.9


def server_idle_limit(
    backend: str, dbapi_connection: Any, *, rollback: bool = True
) -> float | None:
    """The server's idle limit for this session in seconds, or None if it has none.

    MySQL/MariaDB: ``@@session.wait_timeout``. PostgreSQL: ``idle_session_timeout`` (14+;
    0 means off). One round trip (plus, with ``rollback``, a rollback of the implicit
    transaction the query opened).

    Args:
        backend: ``"mysql"``, ``"mariadb"`` or ``"postgresql"`` (a SQLAlchemy dialect name
            or a Django vendor); any other answers None without a query.
        dbapi_connection: the driver's connection to ask on.
        rollback: end the transaction the query opened (False where the caller's
            connection is in autocommit mode or manages its own transactions).
    """
    if backend in ("mysql", "mariadb"):
        sql, scale = "SELECT @@session.wait_timeout", 1.0
    elif backend == "postgresql":
        sql = "SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'"
        scale = 0.001  # pg_settings reports it in milliseconds
    else:
        return None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    finally:
        cursor.close()
    if rollback:
        dbapi_connection.rollback()
    if not row or row[0] is None:
        return None
    seconds = float(row[0]) * scale
    return seconds if seconds > 0 else None
