"""The one reset entry point every fork hook calls.

Hooks that lead here: ``os.register_at_fork(after_in_child=...)`` (installed on import;
covers ``os.fork``, multiprocessing's fork start method, gunicorn, Celery prefork),
``forksafe.gunicorn.post_fork``, ``forksafe.uwsgi`` (uWSGI forks in C), the pid check at
every pool checkout of a tracked engine, and the public `after_fork` for anything else.

Invariants:

* **Once per process.** ``_STATE.pid`` is the pid whose connections are current. A hook
  that finds ``os.getpid() == _STATE.pid`` does nothing, so several hooks on one fork reset
  once. ``_STATE.pid`` is written as the *last* step of a reset: a thread that reads the
  new value without the lock can rely on the reset being complete.
* **Never raises into the host.** A raising gunicorn ``post_fork`` halts the whole server,
  so every step is wrapped; failures go to the ``forksafe`` logger and to
  `internal_errors()` (the test suite asserts that list is empty).
* **Two threads of a child may race** to reset (a fork no hook saw, detected at checkout by
  two threads at once). ``_RESET_LOCK`` serialises them and the second finds the pid
  already current. If ``_RESET_LOCK`` was itself held across a fork no hook saw, the
  acquire times out and the child replaces it; see ``_registry`` for the same argument.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Final, Literal

from forksafe import _sockets
from forksafe._registry import LOCK_TIMEOUT, REGISTRY, ConnectionEntry

__all__ = [
    "AFTER_RESET",
    "BEFORE_RESET",
    "after_fork",
    "current_pid",
    "internal_errors",
    "register_child_callback",
    "report_internal_error",
    "unregister_child_callback",
]

logger = logging.getLogger("forksafe")


class _State:
    __slots__ = ("pid", "resets")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.resets = 0


_STATE = _State()
_RESET_LOCK = threading.Lock()
_INTERNAL_ERRORS: deque[BaseException] = deque(maxlen=100)

#: Child callbacks that run before forksafe resets the tracked objects (forksafe._instrument's
#: report of untracked connections, which must see them as inherited).
BEFORE_RESET: Final = "before_reset"
#: Child callbacks that run after the reset (integrations that hold connections outside the
#: registry, such as forksafe.django).
AFTER_RESET: Final = "after_reset"
Phase = Literal["before_reset", "after_reset"]

# Plain lists, copied before iteration: registration happens at import time, not
# concurrently with forks.
_CHILD_CALLBACKS: dict[Phase, list[Callable[[], object]]] = {BEFORE_RESET: [], AFTER_RESET: []}


def register_child_callback(fn: Callable[[], object], *, phase: Phase = AFTER_RESET) -> None:
    """Run ``fn()`` in every child, before or after forksafe's reset of the tracked objects.

    For code that keeps connections where the registry cannot see them (Django's per-alias
    connections: `AFTER_RESET`) or that must look at the inherited ones first (`BEFORE_RESET`).
    Callbacks of a phase run in registration order, once per reset of a process;
    registering the same function twice is a no-op. A callback that raises is reported
    through `report_internal_error` and the others still run: nothing reaches the host
    server.
    """
    callbacks = _CHILD_CALLBACKS[phase]
    if fn not in callbacks:
        callbacks.append(fn)


def unregister_child_callback(fn: Callable[[], object], *, phase: Phase = AFTER_RESET) -> bool:
    """Remove a callback added by `register_child_callback`; return whether it was there."""
    try:
        _CHILD_CALLBACKS[phase].remove(fn)
    except ValueError:
        return False
    return True


def _run_child_callbacks(phase: Phase) -> None:
    for callback in list(_CHILD_CALLBACKS[phase]):
        try:
            callback()
        except Exception as exc:
            report_internal_error(exc, f"the {phase.replace('_', '-')} callback {callback!r}")


def current_pid() -> int:
    """The pid whose connections forksafe considers current (cheap; no syscall)."""
    return _STATE.pid


def internal_errors() -> list[BaseException]:
    """Errors that fork-time code caught and logged instead of raising, in this process."""
    return list(_INTERNAL_ERRORS)


def report_internal_error(exc: BaseException, what: str = "") -> None:
    """Log an error that must not reach the host server, and remember it for tests."""
    _INTERNAL_ERRORS.append(exc)
    if what:
        logger.error("forksafe: %s failed in pid %d: %r", what, os.getpid(), exc, exc_info=exc)
    else:
        logger.error("%s", exc)


def after_fork() -> bool:
    """Make this process's tracked connections its own, if it is a child that was not reset.

    Call it first thing in a forked process that no hook covers (forksafe's hooks already
    call it). It is cheap when there is nothing to do and it never raises.

    Returns:
        True if this call reset the process; False if it was already current.
    """
    pid = os.getpid()
    if pid == _STATE.pid:
        return False
    global _RESET_LOCK  # noqa: PLW0603 - replaced only when a fork stranded it (see above)
    if not _RESET_LOCK.acquire(timeout=LOCK_TIMEOUT):
        _RESET_LOCK = threading.Lock()
        _RESET_LOCK.acquire()
    try:
        if pid == _STATE.pid:
            return False
        _reset(pid)
        _STATE.resets += 1
        _STATE.pid = pid  # last: readers without the lock see a finished reset
        return True
    except BaseException as exc:  # pragma: no cover - _reset already catches per step
        report_internal_error(exc, "reset after fork")
        _STATE.pid = pid
        return True
    finally:
        _RESET_LOCK.release()


def _reset(pid: int) -> None:
    _run_child_callbacks(BEFORE_RESET)
    inherited, engines = REGISTRY.take_inherited(pid)
    for conn, entry in inherited:
        try:
            neutralise(conn, entry)
        except Exception as exc:
            report_internal_error(exc, f"neutralising an inherited {entry.driver.name} socket")
    for adapter in engines:
        try:
            adapter.reset_in_child()
        except Exception as exc:
            report_internal_error(exc, "giving a tracked engine a fresh pool")
    _run_child_callbacks(AFTER_RESET)
    if inherited or engines:
        logger.debug(
            "forksafe: pid %d reset %d engine(s), neutralised %d inherited connection(s)",
            pid,
            len(engines),
            len(inherited),
        )


def neutralise(conn: object, entry: ConnectionEntry) -> bool:
    """Point an inherited connection's socket at a dummy so the child cannot write to it."""
    try:
        fd = entry.driver.socket_fd(conn)
    except Exception:  # a closed connection: nothing is shared any more
        return False
    if fd is None:
        return False
    return _sockets.neutralise_fd(fd)


def _before_fork() -> None:
    try:
        REGISTRY.before_fork()
    except Exception as exc:  # pragma: no cover - defensive: never break os.fork()
        report_internal_error(exc, "taking the registry lock before fork")


def _after_fork_in_parent() -> None:
    try:
        REGISTRY.after_fork_in_parent()
    except Exception as exc:  # pragma: no cover
        report_internal_error(exc, "releasing the registry lock after fork")


def _after_fork_in_child() -> None:
    global _RESET_LOCK  # noqa: PLW0603 - the child is single-threaded here
    try:
        REGISTRY.after_fork_in_child()
        _RESET_LOCK = threading.Lock()
        after_fork()
    except BaseException as exc:  # pragma: no cover - after_fork never raises
        report_internal_error(exc, "the at-fork hook")


def install_os_hooks() -> None:
    """Register with ``os.register_at_fork`` (once per interpreter; it cannot be undone)."""
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
