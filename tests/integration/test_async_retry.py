"""forksafe.retry_on_disconnect and retrying on coroutines, against a real PostgreSQL.

The session doing the work is ended from the server side (``pg_terminate_backend``) in the
middle of the first attempt: the decorated ``async def`` runs again on a new connection and
returns; the same coroutine undecorated fails. Before coroutines were supported the
decorator returned the coroutine unawaited, so the failure reached the caller unretried.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import forksafe

pytestmark = [pytest.mark.postgres]


def _terminate(postgres: Any, backend_pid: int) -> None:
    rows = postgres.execute(
        f"SELECT pg_terminate_backend({int(backend_pid)})", database="postgres"
    )
    assert rows == [(True,)], f"backend {backend_pid} was not terminated: {rows}"


async def _work(engine: AsyncEngine, postgres: Any, backends: list[int]) -> int:
    """Read the backend pid; the first time, have the server end that session, then query."""
    async with engine.connect() as conn:
        pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        backends.append(pid)
        if len(backends) == 1:
            # another connection ends this one (the sync client blocks the loop briefly)
            _terminate(postgres, pid)
        return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())


def test_decorated_coroutine_survives_a_terminated_session(postgres: Any) -> None:
    """``@retry_on_disconnect`` on an ``async def``: the terminated session's error is
    retried on a new session and the result comes back; undecorated, the error reaches
    the caller."""

    async def main() -> tuple[list[int], list[int], BaseException | None]:
        engine = forksafe.track(create_async_engine(postgres.url("psycopg_async")))
        plain_backends: list[int] = []
        retried_backends: list[int] = []
        failure: BaseException | None = None
        try:
            try:
                await _work(engine, postgres, plain_backends)
            except exc.OperationalError as err:
                failure = err

            @forksafe.retry_on_disconnect(attempts=3, backoff=0.01)
            async def read() -> int:
                return await _work(engine, postgres, retried_backends)

            assert await read() == 42
        finally:
            forksafe.untrack(engine)
            await engine.dispose()
        return plain_backends, retried_backends, failure

    plain, retried, failure = asyncio.run(main())
    assert failure is not None, "the control: a terminated session fails the plain coroutine"
    assert forksafe.errors.classify(failure) is not None
    assert len(plain) == 1
    assert len(retried) == 2, retried
    assert retried[0] != retried[1], "the retry ran on a new session"
    assert not postgres.session_alive(retried[0])


def test_async_for_retrying_survives_a_terminated_session(postgres: Any) -> None:
    """The block form, ``async for attempt in forksafe.retrying(...)``, does the same."""

    async def main() -> tuple[int, list[int]]:
        engine = create_async_engine(postgres.url("psycopg_async"))
        backends: list[int] = []
        result = -1
        try:
            async for attempt in forksafe.retrying(attempts=3, backoff=0.01):
                with attempt:
                    result = await _work(engine, postgres, backends)
        finally:
            await engine.dispose()
        return result, backends

    result, backends = asyncio.run(main())
    assert result == 42
    assert len(backends) == 2, backends
    assert backends[0] != backends[1], backends
