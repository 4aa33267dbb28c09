"""Every lock fork-time code takes is safe to find held in a child.

A thread of the parent holds the lock while the main thread forks; the child then does what
takes that lock. With ``os.fork`` the at-fork hook gives the child a fresh lock at once;
with libc's ``fork`` (no hook runs, as under uWSGI) the child waits `LOCK_TIMEOUT` and
replaces it, reporting `ChildDeadlockedError`. Either way the child finishes: the bounded
wait of ``run_in_child`` fails the test if it hangs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import forksafe
from forksafe import _fork, _instrument, _state, errors
from forksafe._registry import REGISTRY
from tests.forking import run_in_child

WAIT = 60.0


@contextlib.contextmanager
def held_by_a_thread(lock: Any) -> Iterator[None]:
    """A thread takes ``lock`` and keeps it until the block ends."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            release.wait(WAIT)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(WAIT), "the thread never took the lock"
    try:
        yield
    finally:
        release.set()
        thread.join(WAIT)


def _take_registry() -> object:
    return len(REGISTRY.snapshot()[0])


def _take_reset() -> object:
    return forksafe.after_fork()


def _take_instrument() -> object:
    return len(forksafe.connections())


def _take_errors() -> object:
    errors.reset_reported()
    return errors.report(ConnectionRefusedError("Connection refused"), level=logging.DEBUG)


def _take_classes() -> object:
    from sqlalchemy.pool import QueuePool

    from forksafe import sqlalchemy as adapter

    class ChildPool(QueuePool):  # a class never seen: its tracked subclasses are made now
        pass

    return adapter._tracked_classes(ChildPool)[0].__name__


def _classes_lock() -> Any:
    from forksafe import sqlalchemy as adapter

    return adapter._CLASSES_LOCK


LOCKS: dict[str, tuple[Callable[[], Any], Callable[[], object]]] = {
    "classes": (_classes_lock, _take_classes),
    "registry": (lambda: REGISTRY._lock, _take_registry),
    "reset": (lambda: _fork._RESET_LOCK, _take_reset),
    "instrument": (lambda: _instrument._LOCK, _take_instrument),
    "errors": (lambda: errors._REPORTED_LOCK, _take_errors),
}


@pytest.fixture
def short_lock_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libc-forked child waits this long before replacing a stranded lock."""
    monkeypatch.setattr(_state, "LOCK_TIMEOUT", 0.5)


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_os_fork_child_gets_a_free_lock(name: str) -> None:
    """``os.fork`` while another thread holds the lock: the child takes it at once, and
    reports nothing."""
    get_lock, take = LOCKS[name]
    lock = get_lock()
    with held_by_a_thread(lock):
        run_in_child(lambda: repr(take()), timeout=WAIT)


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_fork_no_hook_saw_replaces_a_stranded_lock(name: str, short_lock_timeout: None) -> None:
    """libc ``fork`` while another thread holds the lock: the child replaces it after the
    timeout and says so (`ChildDeadlockedError`), instead of hanging for ever."""
    get_lock, take = LOCKS[name]
    lock = get_lock()

    def child() -> list[str]:
        take()
        return [repr(e) for e in forksafe.internal_errors()]

    with held_by_a_thread(lock):
        reported = run_in_child(child, timeout=WAIT, hooks=False, allow_internal_errors=True)
    assert any("ChildDeadlockedError" in e for e in reported), reported


def test_the_lock_released_is_the_one_acquired(short_lock_timeout: None) -> None:
    """Thread A holds the lock of "another process"; thread B times out and replaces it.
    A's release must release A's lock, not the replacement B now holds."""
    lock = _state.ForkLock("test")
    lock._pid = -1  # as if created by the parent of a fork no hook saw
    token_a = lock.acquire()
    got_b = threading.Event()
    release_b = threading.Event()
    tokens: list[Any] = []

    def thread_b() -> None:
        tokens.append(lock.acquire())
        got_b.set()
        release_b.wait(WAIT)
        _state.ForkLock.release(tokens[0])

    before = len(forksafe.internal_errors())
    b = threading.Thread(target=thread_b, daemon=True)
    b.start()
    assert got_b.wait(WAIT)
    assert tokens[0] is not token_a, "B did not replace the stranded lock"
    _state.ForkLock.release(token_a)
    assert tokens[0].locked(), "A's release freed the lock B holds"
    release_b.set()
    b.join(WAIT)
    assert not tokens[0].locked()
    replaced = forksafe.internal_errors()[before:]
    assert len(replaced) == 1
    assert "test lock" in str(replaced[0])
    # the conftest check of swallowed errors: this one was provoked on purpose
    _state._INTERNAL_ERRORS.pop()


def test_a_reentrant_fork_lock_is_reentrant() -> None:
    lock = _state.ForkLock("test", reentrant=True)
    with lock, lock:
        pass
    with lock:
        pass
