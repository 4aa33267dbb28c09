"""forksafe.retry_on_disconnect and retrying on coroutines, against real servers.

The session doing the work is ended from the server side in the middle of the first
attempt (``pg_terminate_backend`` on the private PostgreSQL, ``KILL CONNECTION`` on the
private MariaDB): the decorated ``async def`` runs again on a new connection and returns;
the same coroutine undecorated fails. Before coroutines were supported the decorator
returned the coroutine unawaited, so the failure reached the caller unretried. Every
asyncio driver SQLAlchemy has for the two servers: psycopg 3, asyncpg, aiomysql, asyncmy.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import forksafe
import forksafe.sqlalchemy

DRIVERS = [
    pytest.param("psycopg_async", marks=pytest.mark.postgres),
    pytest.param("asyncpg", marks=pytest.mark.postgres),
    pytest.param("aiomysql", marks=pytest.mark.mariadb),
    pytest.param("asyncmy", marks=pytest.mark.mariadb),
]


class Target:
    """One private server, seen through one asyncio driver."""

    def __init__(self, request: pytest.FixtureRequest, driver: str) -> None:
        self.postgres = driver in ("psycopg_async", "asyncpg")
        self.server = request.getfixturevalue("postgres" if self.postgres else "mariadb")
        self.url = self.server.url(driver)
        self.session_sql = "SELECT pg_backend_pid()" if self.postgres else "SELECT CONNECTION_ID()"

    def end_session(self, session: int) -> None:
        """End the session from the server side, on another connection."""
        if self.postgres:
            rows = self.server.execute(f"SELECT pg_terminate_backend({int(session)})",
                                       database="postgres")
            assert rows == [(True,)], f"session {session} was not terminated: {rows}"
        else:
            self.server.execute(f"KILL CONNECTION {int(session)}")

    def session_alive(self, session: int) -> bool:
        if self.postgres:
            return bool(self.server.session_alive(session))
        rows = self.server.execute(
            f"SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = {int(session)}")
        return bool(rows)


@pytest.fixture(params=DRIVERS)
def target(request: pytest.FixtureRequest) -> Target:
    return Target(request, request.param)


async def _work(engine: AsyncEngine, target: Target, sessions: list[int]) -> int:
    """Read the session id; the first time, have the server end that session; then query."""
    async with engine.connect() as conn:
        session = int((await conn.execute(text(target.session_sql))).scalar_one())
        sessions.append(session)
        if len(sessions) == 1:
            target.end_session(session)  # the sync client blocks the loop briefly
        return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())


def test_decorated_coroutine_survives_an_ended_session(target: Target) -> None:
    """``@retry_on_disconnect`` on an ``async def``: the ended session's error is retried
    on a new session and the result comes back; undecorated, the error reaches the caller."""

    async def main() -> tuple[list[int], list[int], BaseException | None]:
        engine = forksafe.track(create_async_engine(target.url))
        plain_sessions: list[int] = []
        retried_sessions: list[int] = []
        failure: BaseException | None = None
        try:
            try:
                await _work(engine, target, plain_sessions)
            except exc.DBAPIError as err:
                failure = err

            @forksafe.retry_on_disconnect(attempts=3, backoff=0.01)
            async def read() -> int:
                return await _work(engine, target, retried_sessions)

            assert await read() == 42
        finally:
            forksafe.untrack(engine)
            await engine.dispose()
        return plain_sessions, retried_sessions, failure

    plain, retried, failure = asyncio.run(main())
    assert failure is not None, "the control: an ended session fails the plain coroutine"
    kind = forksafe.errors.classify(failure)
    assert kind is not None, failure
    assert kind.disconnect, kind
    assert len(plain) == 1
    assert len(retried) == 2, retried
    assert retried[0] != retried[1], "the retry ran on a new session"
    assert not target.session_alive(retried[0])


def test_async_for_retrying_survives_an_ended_session(target: Target) -> None:
    """The block form, ``async for attempt in forksafe.retrying(...)``, does the same."""

    async def main() -> tuple[int, list[int]]:
        engine = create_async_engine(target.url)
        sessions: list[int] = []
        result = -1
        try:
            async for attempt in forksafe.retrying(attempts=3, backoff=0.01):
                with attempt:
                    result = await _work(engine, target, sessions)
        finally:
            await engine.dispose()
        return result, sessions

    result, sessions = asyncio.run(main())
    assert result == 42
    assert len(sessions) == 2, sessions
    assert sessions[0] != sessions[1], sessions


def test_forksafe_handles_the_error_inside_the_greenlet(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """An AsyncEngine runs SQLAlchemy's sync code in a greenlet: forksafe's handle_error
    runs there too (the ended session's error is flagged as a disconnect and explained in
    forksafe's log), while at statements the tracked dialect reports no listeners."""
    caplog.set_level("WARNING", logger="forksafe")
    forksafe.errors.reset_reported()
    flags: list[bool] = []

    async def main() -> exc.DBAPIError:
        engine = forksafe.track(create_async_engine(target.url))
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute",
                     lambda *args: flags.append(sync_engine.dialect._has_events))
        try:
            with pytest.raises(exc.DBAPIError) as info:
                await _work(engine, target, [])
            return info.value
        finally:
            forksafe.untrack(engine)
            await engine.dispose()

    failure = asyncio.run(main())
    assert failure.connection_invalidated
    explained = [r.getMessage() for r in caplog.records if "Likely cause" in r.getMessage()]
    assert len(explained) == 1, explained
    if forksafe.sqlalchemy._HANDLE_ERROR_ON_DIALECT:
        assert flags == [False, False], flags
