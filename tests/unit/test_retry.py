"""Unit tests of forksafe.retry: what is retried, how often, and what is never repeated."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import MySQLdb
import pytest

import forksafe
from forksafe.retry import in_commit, retrying


def test_retries_a_disconnect_then_returns() -> None:
    """A unit of work that hits a disconnect runs again and its result is returned."""
    calls = []

    @forksafe.retry_on_disconnect(attempts=3, backoff=0.0)
    def work() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MySQLdb.OperationalError(2006, "MySQL server has gone away")
        return "ok"

    assert work() == "ok"
    assert len(calls) == 3


def test_gives_up_after_attempts() -> None:
    """After the last attempt the disconnect error itself propagates."""
    calls = []

    @forksafe.retry_on_disconnect(attempts=2, backoff=0.0)
    def work() -> None:
        calls.append(1)
        raise MySQLdb.OperationalError(2013, "Lost connection to MySQL server during query")

    with pytest.raises(MySQLdb.OperationalError) as info:
        work()
    assert info.value.args[0] == 2013
    assert len(calls) == 2


@pytest.mark.parametrize(
    "error",
    [
        MySQLdb.ProgrammingError(1064, "syntax error"),
        MySQLdb.IntegrityError(1062, "Duplicate entry"),
        MySQLdb.OperationalError(2014, "Commands out of sync"),
        ValueError("application bug"),
    ],
)
def test_does_not_retry_other_errors(error: Exception) -> None:
    """Errors that are not retry-safe disconnects propagate on the first attempt."""
    calls = []

    @forksafe.retry_on_disconnect(attempts=5, backoff=0.0)
    def work() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        work()
    assert len(calls) == 1


def test_backoff_is_bounded_and_grows() -> None:
    """Delays double from ``backoff`` (with jitter in [50%, 100%]) and never pass the cap."""
    policy = retrying(attempts=10, backoff=0.1, max_backoff=0.5)
    for n, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        for _ in range(20):
            assert ceiling * 0.5 <= policy.delay(n) <= ceiling


def test_timeout_stops_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    """No new attempt starts after ``timeout`` seconds, even with attempts left.

    The clock is the policy's own (``time.monotonic`` and ``time.sleep`` in forksafe.retry),
    replaced by a fake one so that the machine's speed cannot change the count."""
    import forksafe.retry as retry_module

    now = [1000.0]
    monkeypatch.setattr(retry_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(
        retry_module.time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds)
    )
    calls = []

    def run() -> None:
        for attempt in retrying(attempts=1000, backoff=0.05, max_backoff=0.05, timeout=0.3):
            with attempt:
                calls.append(now[0])
                raise MySQLdb.OperationalError(2006, "gone away")

    with pytest.raises(MySQLdb.OperationalError):
        run()
    # pauses of 25-50 ms (jitter); a retry is decided while less than 0.3 s have passed, so
    # 7 to 13 attempts, and the last one starts at most one pause after the timeout
    assert 7 <= len(calls) <= 13
    assert calls[-1] - calls[0] < 0.3 + 0.05


def test_before_retry_runs_between_attempts() -> None:
    """``before_retry`` runs once before each repeated attempt, not before the first."""
    events: list[str] = []
    for attempt in retrying(attempts=3, backoff=0.0, before_retry=lambda: events.append("b")):
        with attempt:
            events.append("w")
            if events.count("w") < 3:
                raise MySQLdb.OperationalError(2006, "gone away")
    assert events == ["w", "b", "w", "b", "w"]


def test_invalid_arguments() -> None:
    """Nonsense settings are refused up front with a clear message."""
    with pytest.raises(ValueError, match="attempts"):
        retrying(attempts=0)
    with pytest.raises(ValueError, match="negative"):
        retrying(backoff=-1)


def test_error_outside_commit_is_not_a_commit_failure() -> None:
    """An error raised by ordinary code is not mistaken for a failure during COMMIT."""
    with pytest.raises(MySQLdb.OperationalError) as info:
        raise MySQLdb.OperationalError(2006, "gone away")
    assert not in_commit(info.value)


# -- coroutines ------------------------------------------------------------------------------


def test_coroutine_is_awaited_and_retried() -> None:
    """On an ``async def`` the decorator awaits each attempt and retries a disconnect;
    before, it returned the coroutine unawaited and the disconnect reached the caller."""
    calls = []

    @forksafe.retry_on_disconnect(attempts=3, backoff=0.0)
    async def work(value: str) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MySQLdb.OperationalError(2006, "MySQL server has gone away")
        return value

    assert inspect.iscoroutinefunction(work)
    assert asyncio.run(work("ok")) == "ok"
    assert len(calls) == 3


def test_coroutine_gives_up_and_does_not_retry_other_errors() -> None:
    """The async form keeps the rules: the last disconnect propagates after ``attempts``,
    anything else at once."""
    calls: list[str] = []

    @forksafe.retry_on_disconnect(attempts=2, backoff=0.0)
    async def lost() -> None:
        calls.append("lost")
        raise MySQLdb.OperationalError(2013, "Lost connection to MySQL server during query")

    @forksafe.retry_on_disconnect(attempts=5, backoff=0.0)
    async def bug() -> None:
        calls.append("bug")
        raise ValueError("application bug")

    with pytest.raises(MySQLdb.OperationalError):
        asyncio.run(lost())
    with pytest.raises(ValueError, match="application bug"):
        asyncio.run(bug())
    assert calls == ["lost", "lost", "bug"]


def test_async_pause_lets_other_tasks_run() -> None:
    """The pause between attempts is ``asyncio.sleep``: another task runs during it (with
    ``time.sleep`` the event loop would stand still and the other task would not run)."""
    order: list[str] = []

    async def main() -> None:
        other_ran = asyncio.Event()

        async def other() -> None:
            order.append("other")
            other_ran.set()

        @forksafe.retry_on_disconnect(attempts=2, backoff=0.05, max_backoff=0.05)
        async def work() -> None:
            order.append("work")
            if len(order) == 1:
                asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(other()))
                raise MySQLdb.OperationalError(2006, "gone away")
            assert other_ran.is_set()

        await work()

    asyncio.run(main())
    assert order == ["work", "other", "work"]


def test_async_for_retrying_and_awaited_before_retry() -> None:
    """``async for attempt in retrying(...)`` retries the block; a coroutine ``before_retry``
    is awaited before each new attempt."""
    events: list[str] = []

    async def before() -> None:
        events.append("b")

    async def main() -> None:
        async for attempt in retrying(attempts=3, backoff=0.0, before_retry=before):
            with attempt:
                events.append("w")
                if events.count("w") < 3:
                    raise MySQLdb.OperationalError(2006, "gone away")

    asyncio.run(main())
    assert events == ["w", "b", "w", "b", "w"]


def test_sync_wrapper_returning_a_coroutine_is_refused() -> None:
    """A plain function that returns a coroutine (a lambda around an async call) cannot be
    retried: the decorator says so instead of returning work it never ran."""

    async def inner() -> int:
        return 1

    def sync_caller() -> Any:
        return inner()

    wrapped = forksafe.retry_on_disconnect(sync_caller)
    with pytest.raises(TypeError, match="async def"):
        wrapped()
