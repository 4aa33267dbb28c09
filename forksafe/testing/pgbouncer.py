"""A private PgBouncer in front of a PostgreSQL server, on a free port.

Built like `forksafe.testing.postgres`: mirakuru's `TCPExecutor` runs ``pgbouncer`` in the
foreground in its own session, in a temporary directory of its own (config, user list, log),
and stops the whole process group. PgBouncer refuses to run as root, so as root it runs as
the ``postgres`` system user, like the private PostgreSQL.

Every database name is forwarded to the backend (``* = host=... port=...``); authentication
is ``trust`` (the suite's PostgreSQL trusts local clients too); ``postgres`` is an admin of
the console (database ``pgbouncer``: ``SHOW CONFIG``, ``SHOW CLIENTS``, ``SHOW SERVERS``).
``pool_mode`` is ``session`` or ``transaction``; other settings (``client_idle_timeout``,
``server_idle_timeout``, ``max_client_conn``, ...) go in ``options``.

Usage::

    with PostgreSQL() as pg, PgBouncer(pg, pool_mode="transaction") as bouncer:
        engine = create_engine(bouncer.url("psycopg2"))
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from forksafe.testing._server import PrivateServer
from forksafe.testing.mariadb import ServerUnavailableError, free_port
from forksafe.testing.postgres import DATABASE, SUPERUSER, SYSTEM_USER, _as_user_prefix

__all__ = ["PLAIN_USER", "POOL_MODES", "PgBouncer", "find_pgbouncer"]

POOL_MODES = ("session", "transaction")
#: a user PgBouncer lets in but not into its admin console (create the role on the backend)
PLAIN_USER = "forksafe_app"


def find_pgbouncer() -> str:
    """The ``pgbouncer`` binary (PATH, /usr/sbin, /usr/bin).

    Raises:
        ServerUnavailableError: it is not installed.
    """
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise ServerUnavailableError(
        "pgbouncer not found: install PgBouncer (Debian: apt-get install pgbouncer)"
    )


class PgBouncer(PrivateServer):
    """A private ``pgbouncer`` in front of ``backend`` (a server with ``.port``).

    Args:
        backend: the PostgreSQL server to pool connections to (``127.0.0.1:backend.port``).
        pool_mode: ``session`` or ``transaction``.
        port: TCP port on 127.0.0.1; a free one by default.
        options: more ``[pgbouncer]`` settings, e.g. ``{"client_idle_timeout": "2"}``.
    """

    default_database = DATABASE
    login_database = DATABASE

    def __init__(
        self,
        backend: Any,
        pool_mode: str = "session",
        port: int | None = None,
        *,
        options: dict[str, str] | None = None,
    ) -> None:
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, not {pool_mode!r}")
        self.binary = find_pgbouncer()
        self.prefix = _as_user_prefix()
        self.backend = backend
        self.pool_mode = pool_mode
        self.owns_basedir = True
        self.basedir = Path(tempfile.mkdtemp(prefix="forksafe-pgbouncer-"))
        self.log_path = self.basedir / "pgbouncer.log"
        self.port = port or free_port()
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.basedir / "userlist.txt"),
            "admin_users": SUPERUSER,
            "stats_users": SUPERUSER,
            "pool_mode": pool_mode,
            "max_client_conn": "400",
            "default_pool_size": "40",
            "ignore_startup_parameters": "extra_float_digits,options",
            "log_connections": "1",
            "log_disconnections": "1",
            "logfile": str(self.log_path),
        }
        settings.update(options or {})
        self.settings = settings
        config = ["[databases]", f"* = host=127.0.0.1 port={int(backend.port)}", "",
                  "[pgbouncer]", *(f"{k} = {v}" for k, v in settings.items())]
        self.config_path = self.basedir / "pgbouncer.ini"
        self.config_path.write_text("\n".join(config) + "\n")
        # trust still needs the user in the list; PLAIN_USER is no admin of the console
        users = (SUPERUSER, PLAIN_USER)
        (self.basedir / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in users))
        if self.prefix:  # root: PgBouncer runs as postgres and writes its log here
            info = pwd.getpwnam(SYSTEM_USER)
            for path in (self.basedir, self.config_path, self.basedir / "userlist.txt"):
                os.chown(path, info.pw_uid, info.pw_gid)
        super().__init__(
            [*self.prefix, self.binary, str(self.config_path)],
            host="127.0.0.1",
            port=self.port,
            timeout=30,
            stop_signal=15,  # SIGTERM: immediate shutdown (SIGINT waits for every client)
            expected_returncode=0,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # everything goes to the log file too
        )

    def start(self) -> PgBouncer:
        """Start PgBouncer and wait until a client gets through it to the backend."""
        try:
            super().start()
        except Exception as exc:
            raise ServerUnavailableError(
                f"pgbouncer did not start on port {self.port}: {exc}. Log:\n{self.log_tail()}"
            ) from exc
        self._wait_for_login()
        return self

    def stop(self, stop_signal: int | None = None, expected_returncode: int | None = None) -> Any:
        """Stop PgBouncer (it exits 1 on SIGTERM's "fast exit": that is not an error)."""
        from mirakuru.exceptions import ProcessFinishedWithError

        try:
            return super().stop(stop_signal, expected_returncode)
        except ProcessFinishedWithError:
            return self

    # -- clients -----------------------------------------------------------------------------
    def url(
        self, driver: str = "psycopg2", database: str = DATABASE, user: str = SUPERUSER
    ) -> str:
        """A SQLAlchemy URL through PgBouncer (``postgresql+<driver>://postgres@...``)."""
        return f"postgresql+{driver}://{user}@127.0.0.1:{self.port}/{database}"

    def connect_kwargs(self, database: str = DATABASE) -> dict[str, Any]:
        """Keyword arguments for ``psycopg2.connect`` / ``psycopg.connect`` through it."""
        return {"host": "127.0.0.1", "port": self.port, "user": SUPERUSER, "dbname": database}

    def connect(self, database: str = DATABASE) -> Any:
        """A new raw psycopg2 connection through PgBouncer, autocommit on.

        psycopg2 speaks the simple query protocol, which the admin console (database
        ``pgbouncer``) requires.
        """
        import psycopg2

        conn = psycopg2.connect(**self.connect_kwargs(database))
        conn.autocommit = True
        return conn

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run an admin console command (``SHOW CONFIG``, ``SHOW SERVERS``) as dicts."""
        conn = self.connect("pgbouncer")
        try:
            cur = conn.cursor()
            cur.execute(command)
            if cur.description is None:
                return []
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=False)) for row in cur.fetchall()]
        finally:
            conn.close()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of PgBouncer's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
