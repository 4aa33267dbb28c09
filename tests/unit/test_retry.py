"""Unit tests of forksafe.retry: what is retried, how often, and what is never repeated."""

from __future__ import annotations

import time

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


def test_timeout_stops_retrying() -> None:
    """No new attempt starts after ``timeout`` seconds, even with attempts left."""
    calls = []
    start = time.monotonic()

    def run() -> None:
        for attempt in retrying(attempts=1000, backoff=0.05, max_backoff=0.05, timeout=0.3):
            with attempt:
                calls.append(1)
                raise MySQLdb.OperationalError(2006, "gone away")

    with pytest.raises(MySQLdb.OperationalError):
        run()
    assert time.monotonic() - start < 2.0
    assert 2 <= len(calls) < 20


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
