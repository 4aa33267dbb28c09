"""What the private servers (MariaDB, PostgreSQL) and a server given by URL share."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, TypeVar

from mirakuru import TCPExecutor

__all__ = ["Client", "PrivateServer"]

S = TypeVar("S", bound="PrivateServer")


class Client:
    """``execute()`` on a fresh connection, for any server that can ``connect(database)``."""

    #: the database ``execute`` uses when none is given
    default_database = ""

    def connect(self, database: str) -> Any:
        """A new raw connection, autocommit on."""
        raise NotImplementedError

    def execute(self, sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh connection and return its rows."""
        conn = self.connect(self.default_database if database is None else database)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            rows = list(cur.fetchall()) if cur.description else []
            cur.close()
            return rows
        finally:
            conn.close()


class PrivateServer(Client, TCPExecutor):
    """A server we start in a directory of our own: restart, cleanup, context manager."""

    basedir: Path
    owns_basedir: bool
    #: the database that exists right after initialisation, to wait for logins on
    login_database = ""

    def _wait_for_login(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.execute("SELECT 1", database=self.login_database)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server (gracefully), optionally stay down a while, start it again."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory (if it made it)."""
        if self.running():
            self.stop()
        if self.owns_basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self: S) -> S:
        started: S = self.start()
        return started

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
