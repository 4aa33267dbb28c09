"""Safe retries: re-run a unit of work after a disconnect, never a COMMIT that may have landed.

A disconnect (server restart, ``KILL CONNECTION``, an idle connection the server dropped, a
network cut) before COMMIT means the server rolled the transaction back: running the whole
unit of work again on a new connection is safe, *if the work is safe to repeat* (a read, or
writes inside one transaction). A disconnect *during* COMMIT is different: the server may
have committed and the reply was lost. Repeating the work then applies it twice, which is
what a naive ``except OperationalError: retry`` does. forksafe raises `CommitUnknownError`
instead.

How "during COMMIT" is known: the failing call stack contains the commit step of
SQLAlchemy (``Connection._commit_impl`` / ``dialect.do_commit``), of Django
(``BaseDatabaseWrapper._commit``), of psycopg 3 or of PyMySQL (``Connection.commit``).
A raw mysqlclient or psycopg2 ``conn.commit()`` is C code and leaves no such frame: use
SQLAlchemy or Django with these helpers, or do not mark such work as repeatable.

In autocommit mode every statement commits on its own, so a lost INSERT is as uncertain as
a lost COMMIT: only mark work as repeatable there if it is idempotent.

The unit of work must open its own connection or session: a connection held across the
failure is dead, and SQLAlchemy has already dropped it (and every older one) from the pool.

Coroutines: ``@retry_on_disconnect`` on an ``async def`` returns an ``async def`` that
awaits each attempt and pauses with ``asyncio.sleep`` (the event loop keeps serving other
requests meanwhile); ``async for attempt in retrying(...)`` is the block form. The same
rules apply, with an `AsyncEngine` / ``AsyncSession`` opened inside the unit of work.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar, overload

from forksafe import errors
from forksafe.exceptions import CommitUnknownError

__all__ = ["Attempt", "in_commit", "retry_on_disconnect", "retrying"]

logger = logging.getLogger("forksafe")

F = TypeVar("F", bound=Callable[..., Any])

# (top-level package of the frame's module, function name) of the steps that send COMMIT.
_COMMIT_FRAMES = frozenset(
    {
        ("sqlalchemy", "_commit_impl"),
        ("sqlalchemy", "_commit_twophase_impl"),
        ("sqlalchemy", "do_commit"),
        ("sqlalchemy", "do_commit_twophase"),
        ("django", "_commit"),
        ("psycopg", "commit"),
        ("psycopg", "_commit_gen"),
        ("pymysql", "commit"),
    }
)


def in_commit(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a COMMIT was being sent or awaited.

    Looks at the call stack of ``exc`` and of the exceptions it wraps.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        tb = cur.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
            if (package, frame.f_code.co_name) in _COMMIT_FRAMES:
                return True
            tb = tb.tb_next
        for nxt in (getattr(cur, "orig", None), cur.__cause__, cur.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return False


class Attempt:
    """One try of a `retrying` loop; use it as ``with attempt:`` around the unit of work."""

    def __init__(self, number: int, policy: retrying) -> None:
        self.number = number
        self._policy = policy
        self.error: BaseException | None = None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        kind = errors.classify(exc)
        if kind is None or not kind.disconnect:
            return False
        errors.report(exc, self._policy.where)
        if in_commit(exc):
            raise CommitUnknownError(
                "the connection was lost during COMMIT, so the transaction may or may not "
                f"have been committed; not repeating it ({kind.name}). Check whether the "
                "work took effect before doing it again."
            ) from exc
        if not kind.retry_safe or not self._policy.may_retry(self.number):
            return False
        self.error = exc
        return True


class retrying:  # noqa: N801 - used like a function: ``for attempt in retrying(...)``
    """Retry a block of work after a disconnect, with bounded exponential backoff.

    ::

        for attempt in forksafe.retrying(attempts=5):
            with attempt:
                with engine.begin() as conn:
                    conn.execute(insert(orders).values(...))

    Errors that are not disconnects propagate at once; a disconnect during COMMIT raises
    `CommitUnknownError`; after the last attempt (or past ``timeout``) the last disconnect
    error propagates.

    In a coroutine, iterate with ``async for``: the pauses are ``asyncio.sleep`` and a
    ``before_retry`` that returns an awaitable is awaited::

        async for attempt in forksafe.retrying(attempts=5):
            with attempt:
                async with engine.begin() as conn:
                    await conn.execute(insert(orders).values(...))

    Args:
        attempts: how many times to run the block at most (1 means no retry).
        backoff: the first delay in seconds; it doubles each time (with jitter).
        max_backoff: the largest single delay.
        timeout: no new attempt starts more than this many seconds after the first.
        before_retry: called (without arguments) before each new attempt, e.g. to drop
            unusable framework connections (awaited if it returns an awaitable, in the
            ``async for`` form).
        where: a password-free label for log lines (an engine or alias).
    """

    def __init__(
        self,
        *,
        attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        timeout: float = 30.0,
        before_retry: Callable[[], object] | None = None,
        where: str = "",
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if backoff < 0 or max_backoff < 0 or timeout < 0:
            raise ValueError("backoff, max_backoff and timeout must not be negative")
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.before_retry = before_retry
        self.where = where
        self._started = 0.0

    def delay(self, number: int) -> float:
        """The pause after failed attempt ``number`` (1-based): capped, with jitter."""
        ceiling: float = min(self.max_backoff, self.backoff * 2.0 ** (number - 1))
        return float(ceiling * random.uniform(0.5, 1.0))

    def may_retry(self, number: int) -> bool:
        """Whether another attempt may follow failed attempt ``number``."""
        if number >= self.attempts:
            return False
        return time.monotonic() - self._started < self.timeout

    def _pause_after(self, attempt: Attempt) -> float:
        assert attempt.error is not None
        pause = self.delay(attempt.number)
        kind = errors.classify(attempt.error)  # explained once, by errors.report()
        logger.info(
            "%s; retrying in %.2fs (attempt %d of %d)",
            kind.name if kind is not None else type(attempt.error).__name__,
            pause,
            attempt.number + 1,
            self.attempts,
        )
        return pause

    def __iter__(self) -> Iterator[Attempt]:
        self._started = time.monotonic()
        for number in range(1, self.attempts + 1):
            attempt = Attempt(number, self)
            yield attempt
            if attempt.error is None:
                return
            time.sleep(self._pause_after(attempt))
            if self.before_retry is not None:
                self.before_retry()

    async def __aiter__(self) -> AsyncIterator[Attempt]:
        self._started = time.monotonic()
        for number in range(1, self.attempts + 1):
            attempt = Attempt(number, self)
            yield attempt
            if attempt.error is None:
                return
            await asyncio.sleep(self._pause_after(attempt))
            if self.before_retry is not None:
                result = self.before_retry()
                if inspect.isawaitable(result):
                    await result


@overload
def retry_on_disconnect(fn: F, /) -> F: ...


@overload
def retry_on_disconnect(
    fn: None = None,
    /,
    *,
    attempts: int = 5,
    backoff: float = 0.1,
    max_backoff: float = 2.0,
    timeout: float = 30.0,
    before_retry: Callable[[], object] | None = None,
) -> Callable[[F], F]: ...


def retry_on_disconnect(
    fn: F | None = None,
    /,
    *,
    attempts: int = 5,
    backoff: float = 0.1,
    max_backoff: float = 2.0,
    timeout: float = 30.0,
    before_retry: Callable[[], object] | None = None,
) -> F | Callable[[F], F]:
    """Decorate a function whose work is safe to repeat, to re-run it after a disconnect.

    ``@forksafe.retry_on_disconnect`` or ``@forksafe.retry_on_disconnect(attempts=3)``.
    The function must open its own connection or session (a held one is dead after a
    disconnect). Semantics as `retrying`: non-disconnect errors propagate at once, a
    disconnect during COMMIT raises `CommitUnknownError`, never a second run.

    On an ``async def`` the result is an ``async def`` too: each attempt is awaited, the
    pauses are ``asyncio.sleep`` (other tasks run meanwhile) and an awaitable returned by
    ``before_retry`` is awaited.
    """
    def policy_for(func: Callable[..., Any]) -> retrying:
        return retrying(
            attempts=attempts,
            backoff=backoff,
            max_backoff=max_backoff,
            timeout=timeout,
            before_retry=before_retry,
            where=getattr(func, "__qualname__", ""),
        )

    def decorate(func: F) -> F:
        policy_for(func)  # bad arguments fail at decoration time, not on the first call
        if inspect.iscoroutinefunction(func):
            coroutine_function: Callable[..., Awaitable[Any]] = func

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async for attempt in policy_for(coroutine_function):
                    with attempt:
                        return await coroutine_function(*args, **kwargs)
                raise AssertionError("unreachable: the last attempt returns or raises")

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for attempt in policy_for(func):
                with attempt:
                    result = func(*args, **kwargs)
                    if inspect.iscoroutine(result):
                        result.close()  # never awaited: no "never awaited" warning either
                        raise TypeError(
                            f"{getattr(func, '__qualname__', func)!r} returned a coroutine "
                            "but is not an 'async def': forksafe.retry_on_disconnect cannot "
                            "retry work it does not await. Decorate the 'async def' itself, "
                            "or use 'async for attempt in forksafe.retrying(...)'."
                        )
                    return result
            raise AssertionError("unreachable: the last attempt returns or raises")

        return wrapper  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate
