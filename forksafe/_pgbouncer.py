"""Recognise a PgBouncer between the app and PostgreSQL, for ``forksafe doctor --url``.

Through PgBouncer every ordinary query goes to PostgreSQL: ``pg_settings`` describes the
server, not the pooler, although the pooler owns the socket the app holds. What PgBouncer
does to that socket is in its own settings (``client_idle_timeout`` closes idle client
connections, ``max_client_conn`` refuses clients beyond it, ``pool_mode`` decides whether a
client keeps one server connection), which only its admin console shows.

How it is recognised: a connection to the database ``pgbouncer`` (the admin console) with
the URL's user and password. PgBouncer answers ``SHOW VERSION`` ("PgBouncer 1.18.0") and
``SHOW CONFIG`` to users in its ``admin_users`` or ``stats_users``, and refuses everyone else
with "not allowed"; PostgreSQL says the database does not exist. When the console is not
reachable, ``inet_server_port()`` differing from the URL's port still says that something
(a pooler, a proxy) is in between.

Why it matters to forksafe: the fork bug happens on the app-to-pooler socket exactly as on
a direct one, and forksafe protects it the same way. But ``recycle="auto"`` learns
PostgreSQL's ``idle_session_timeout``, not PgBouncer's ``client_idle_timeout``: behind
PgBouncer set ``recycle=`` below ``client_idle_timeout`` (the finding gives the number).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PgBouncerInfo", "pgbouncer_findings", "probe"]

#: PgBouncer's answer to a client that is not in admin_users / stats_users
_NOT_ALLOWED = "not allowed"
#: PostgreSQL's answer: no such database, so no PgBouncer console on this port
_NO_DATABASE = 'database "pgbouncer" does not exist'


@dataclass
class PgBouncerInfo:
    """What the admin console said: its version and settings (empty when refused)."""

    version: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    refused: str = ""  # the console's refusal, when the user may not read it


def _connect_console(url: Any, timeout: int) -> Any:
    kwargs: dict[str, Any] = {
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "user": url.username or "postgres",
        "dbname": "pgbouncer",
        "connect_timeout": timeout,
    }
    if url.password:
        kwargs["password"] = str(url.password)
    try:
        import psycopg2  # the simple query protocol, which the console requires
    except ImportError:
        import psycopg

        return psycopg.connect(**kwargs, autocommit=True)
    conn = psycopg2.connect(**kwargs)
    conn.autocommit = True
    return conn


def _rows(conn: Any, command: str) -> list[dict[str, Any]]:
    cur = conn.cursor()
    try:
        cur.execute(command)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=False)) for row in cur.fetchall()]
    finally:
        cur.close()


def probe(url: Any, timeout: int = 5) -> PgBouncerInfo | None:
    """PgBouncer's version and settings behind ``url`` (a SQLAlchemy URL), or None.

    None means "not a PgBouncer as far as can be told": PostgreSQL itself, or a console
    that could not be reached for another reason (the caller may still compare ports).
    """
    try:
        conn = _connect_console(url, timeout)
    except ImportError:
        return None
    except Exception as exc:
        message = " ".join(str(exc).split())
        if _NOT_ALLOWED in message and _NO_DATABASE not in message:
            return PgBouncerInfo(refused=message.rsplit("FATAL:", 1)[-1].strip())
        return None
    try:
        rows = _rows(conn, "SHOW VERSION")
        version = str(next(iter(rows[0].values()))) if rows else ""
        if not version.startswith("PgBouncer"):
            return None
        settings = {str(r["key"]): str(r["value"]) for r in _rows(conn, "SHOW CONFIG")}
        return PgBouncerInfo(version=version, settings=settings)
    except Exception:
        return None
    finally:
        conn.close()


def _int(settings: dict[str, str], name: str) -> int | None:
    try:
        return int(float(settings[name]))
    except (KeyError, ValueError):
        return None


def _server_port(url: Any, timeout: int) -> int | None:
    """The port PostgreSQL says it listens on (``inet_server_port()``), asked through url."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": timeout})
    try:
        with engine.connect() as conn:
            port = conn.execute(text("SELECT inet_server_port()")).scalar()
        return int(port) if port is not None else None
    finally:
        engine.dispose()


def pgbouncer_findings(url: Any, shown: str, pg: dict[str, tuple[Any, Any]],
                       ctx: Any) -> list[Any] | None:
    """Doctor findings about a PgBouncer behind ``url``, or None when there is none.

    Args:
        url: the SQLAlchemy URL given to ``forksafe doctor --url``.
        shown: its password-free form, for messages.
        pg: what the URL check read from ``pg_settings`` (PostgreSQL's, through the pooler).
        ctx: the doctor's `Context` (workers, pools).

    When a PgBouncer is recognised the list replaces the URL check's capacity finding:
    the app's connections count against ``max_client_conn``, not PostgreSQL's
    ``max_connections``.
    """
    from forksafe.doctor import Finding

    info = probe(url)
    if info is None:
        return _unrecognised_pooler(url, shown)
    if info.refused:
        return [Finding(
            "warning", "pooler", f"{shown} is a PgBouncer; its admin console refused "
            f"{url.username or 'this user'} ({info.refused}), so client_idle_timeout, "
            "pool_mode and max_client_conn cannot be checked",
            "add the user to PgBouncer's stats_users (read-only SHOW) or run forksafe "
            "doctor with an admin user's URL")]
    s = info.settings
    mode = s.get("pool_mode", "?")
    out = [Finding(
        "info", "pooler", f"{shown} is {info.version}, pool_mode = {mode}: the app's "
        "connections end at the pooler, and forksafe protects that socket like any "
        "PostgreSQL connection")]
    client_idle = _int(s, "client_idle_timeout")
    if client_idle:
        out.append(Finding(
            "warning", "pooler", f"{shown}: PgBouncer's client_idle_timeout = {client_idle} s "
            "closes app connections idle that long ('server closed the connection "
            "unexpectedly', 'client_idle_timeout'); recycle='auto' learns PostgreSQL's "
            "idle_session_timeout, not this",
            f"forksafe.track(engine, recycle={max(int(client_idle * 0.9), 1)}) (or "
            "pool_recycle below it)"))
    elif client_idle == 0:
        out.append(Finding("info", "pooler", f"{shown}: client_idle_timeout = 0: PgBouncer "
                           "keeps idle app connections open"))
    server_idle = _int(s, "server_idle_timeout")
    if server_idle is not None:
        out.append(Finding(
            "info", "pooler", f"{shown}: server_idle_timeout = {server_idle} s, "
            f"server_lifetime = {s.get('server_lifetime', '?')} s: PgBouncer's own "
            "connections to PostgreSQL; the app does not see them end"))
    prepared = _int(s, "max_prepared_statements") or 0
    if mode == "transaction" and prepared == 0:
        out.append(Finding(
            "warning", "pooler", f"{shown}: pool_mode = transaction: each transaction may run "
            "on another server connection, so prepared statements (psycopg 3 prepares a "
            "query run 5 times; asyncpg caches them) fail with 'prepared statement ... does "
            "not exist', and SET / advisory locks / LISTEN do not outlive a transaction",
            "psycopg 3: connect_args={'prepare_threshold': None}; asyncpg: "
            "connect_args={'statement_cache_size': 0} with "
            "prepared_statement_cache_size=0 in the URL; or max_prepared_statements "
            "(PgBouncer 1.21+)"))
    out += _client_capacity(shown, _int(s, "max_client_conn"), ctx)
    pool = _int(s, "default_pool_size")
    if pool is not None and "max_connections" in pg:
        reserve = _int(s, "reserve_pool_size") or 0
        out.append(Finding(
            "info", "pooler", f"{shown}: PgBouncer opens at most default_pool_size {pool} + "
            f"reserve_pool_size {reserve} connections to PostgreSQL per database and user; "
            f"PostgreSQL allows {pg['max_connections'][0]}"))
    return out


def _unrecognised_pooler(url: Any, shown: str) -> list[Any] | None:
    """No PgBouncer console: a port that differs from the URL's still reveals a proxy."""
    from forksafe.doctor import Finding

    try:
        server_port = _server_port(url, 5)
    except Exception:
        return None
    wanted = url.port or 5432
    if server_port is None or server_port == wanted:
        return None
    return [Finding(
        "warning", "pooler", f"{shown}: PostgreSQL listens on port {server_port}, not "
        f"{wanted}: a pooler or proxy is in between (not recognised as PgBouncer). Its "
        "idle timeout, not PostgreSQL's idle_session_timeout, decides when the app's "
        "connections are closed; recycle='auto' learns only PostgreSQL's",
        "forksafe.track(engine, recycle=<a little less than the pooler's idle "
        "timeout>); if it is a PgBouncer, let this user read its console (stats_users)")]


def _client_capacity(shown: str, max_client: int | None, ctx: Any) -> list[Any]:
    """workers x pool against PgBouncer's max_client_conn."""
    from forksafe.doctor import Finding, _per_worker

    if not max_client:
        return []
    workers = ctx.workers or 1
    per_worker, how = _per_worker(ctx, "postgresql")
    need = per_worker * workers
    text = (f"{shown}: {workers} worker(s) x {per_worker} connection(s) [{how}] = {need} "
            f"connections to PgBouncer; its max_client_conn is {max_client}")
    if need > max_client:
        return [Finding("error", "pooler", text + ": beyond it clients are refused "
                        "('no more connections allowed')", "lower the pools or workers, or "
                        "raise max_client_conn")]
    if need > 0.8 * max_client:
        return [Finding("warning", "pooler", text + " (over 80%, and other clients need "
                        "some)", "leave headroom: lower the pools or raise max_client_conn")]
    return [Finding("info", "pooler", text)]
