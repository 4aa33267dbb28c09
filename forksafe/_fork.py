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
  already current. It is a `forksafe._state.ForkLock`, like every lock fork-time code takes.
* **Nothing inherited is freed before it is neutralised.** The before-fork hook takes strong
  references to every connection forksafe knows of (the registry's, and whatever other
  modules register with `forksafe._state.register_hold_source`); the child drops them only
  after the reset, the parent right after the fork. See ``forksafe._state``.
* **One neutralise.** Every path that lets go of an inherited connection (the reset, the
  untracked-connection check of ``instrument()``, integrations) calls `neutralise`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any, Final, Literal

from forksafe import _sockets
from forksafe._registry import REGISTRY, ConnectionEntry
from forksafe._state import (
    PROCESS,
    ForkLock,
    check_fork_mark,
    current_pid,
    hold_for_fork,
    internal_errors,
    register_hold_source,
    reinit_locks,
    release_all_holds,
    release_holds,
    report_internal_error,
)
from forksafe.drivers import find_driver, unwrap

__all__ = [
    "AFTER_RESET",
    "BEFORE_RESET",
    "after_fork",
    "current_pid",
    "internal_errors",
    "neutralise",
    "register_child_callback",
    "register_hold_source",
    "report_internal_error",
    "unregister_child_callback",
]

logger = logging.getLogger("forksafe")

_STATE = PROCESS  # the pid and the count of resets (kept under this name for tests)
_RESET_LOCK = ForkLock("reset")
register_hold_source(REGISTRY.connections_to_hold)

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

# Inherited objects the child could not neutralise: kept alive for ever, so that at least no
# destructor of theirs runs (mysqlclient's sends COM_QUIT).
_ORPHANS: list[Any] = []
# ... for ever: not even the interpreter's exit frees the list (module teardown would, and
# run those destructors), so it gets one reference nothing ever drops.
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_ORPHANS))


def park(obj: object) -> None:
    """Keep ``obj`` alive, untouched, for the rest of this process's life (exit included):
    what a child does with a SQLite connection it inherited (`Driver.park`)."""
    _ORPHANS.append(obj)


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
    try:
        token = _RESET_LOCK.acquire()
    except BaseException as exc:  # pragma: no cover - defensive: never raise into the host
        report_internal_error(exc, "taking the reset lock")
        return False
    try:
        if pid == _STATE.pid:
            return False
        check_fork_mark()
        _reset(pid)
        _STATE.resets += 1
        _STATE.pid = pid  # last: readers without the lock see a finished reset
        return True
    except BaseException as exc:  # pragma: no cover - _reset already catches per step
        report_internal_error(exc, "reset after fork")
        _STATE.pid = pid
        return True
    finally:
        ForkLock.release(token)


def _reset(pid: int) -> None:
    _run_child_callbacks(BEFORE_RESET)
    inherited, engines = REGISTRY.take_inherited(pid)
    neutralised = sum(neutralise(conn, entry) for conn, entry in inherited)
    for adapter in engines:
        try:
            adapter.reset_in_child()
        except Exception as exc:
            report_internal_error(exc, "giving a tracked engine a fresh pool")
    _run_child_callbacks(AFTER_RESET)
    if inherited or engines:
        logger.debug(
            "pid %d reset %d engine(s), neutralised %d of %d inherited "
            "connection(s) (the others had no open socket)",
            pid,
            len(engines),
            neutralised,
            len(inherited),
        )


def neutralise(conn: object, entry: ConnectionEntry | None = None) -> bool:
    """Point an inherited connection's socket at a dummy so the child cannot write to it.

    The one function every path that lets go of an inherited connection calls. Never
    raises: a failure is reported (`report_internal_error`) and the object is kept alive
    for good, so that at least its destructor never runs.

    A descriptor is replaced only if it is still the socket recorded when the connection
    was tracked (a number can be reused once the driver's own socket is closed); one that
    is not is left alone, and the log says so. If the driver cannot tell its socket (its
    accessor raises), that is never read as "closed": the descriptor recorded at track time
    is neutralised if it is provably still the same socket (a warning says so), and
    otherwise the failure is reported as an internal error.

    Args:
        conn: a DBAPI connection (or one of SQLAlchemy's wrappers of it).
        entry: its registry entry, if tracked: gives the driver and the descriptor and
            socket identity recorded when it was tracked.

    Returns:
        True if a socket was replaced; False if there was nothing to replace (the driver
        says the connection is closed, or its descriptor number now belongs to something
        else) or it could not be done (reported).
    """
    raw = unwrap(conn)
    driver = entry.driver if entry is not None else find_driver(raw)
    name = driver.name if driver is not None else type(raw).__qualname__
    pid = os.getpid()
    try:
        if driver is None or driver.park:
            # no known driver, or no socket (SQLite): never closed, never finalised here
            park(raw)
            if driver is None:
                logger.warning("pid %d inherited a %s connection of no known driver: "
                               "kept alive, never closed", pid, name)
            return False
        try:
            fd = driver.socket_fd(raw)
        except Exception as exc:  # "could not tell" is not "closed" (see Driver.socket_fd)
            _ORPHANS.append(raw)  # whatever happens next, its destructor never runs
            done = _neutralise_recorded(entry, name, exc)
            if done:
                _note_neutralised(raw)
            return done
        if fd is None:  # the driver says it is closed: nothing is shared any more
            return False
        expected = entry.socket if entry is not None else None
        if expected is not None:
            actual = _sockets.socket_identity(fd)
            if actual != expected:
                logger.warning(
                    "pid %d left descriptor %d alone: the inherited %s connection "
                    "reports it as its socket, but it is now %s (the connection's own "
                    "socket was closed and the number reused)",
                    pid, fd, name, "closed" if actual is None else "another socket",
                )
                return False
        done = _sockets.neutralise_fd(fd)
        if done:
            _note_neutralised(raw)
        return done
    except Exception as exc:
        _ORPHANS.append(raw)
        report_internal_error(exc, f"neutralising an inherited {name} connection's socket "
                                   "(it is kept alive, never closed)")
        return False


def neutralise_if_inherited(conn: object, driver: Any, what: str) -> bool:
    """Neutralise ``conn`` if its socket is also open in this process's parent: a connection
    this process inherited that forksafe did not know of at the fork (``track()`` called
    in the child). Never raises.

    Args:
        conn: the DBAPI connection.
        driver: its `forksafe.drivers.Driver`.
        what: a password-free description for the warning (the engine, or ``track()``).

    Returns:
        True if it was inherited and is neutralised now.
    """
    try:
        fd = driver.socket_fd(conn)
        if fd is None or not _sockets.open_in_parent(fd):
            return False
        done = neutralise(conn)
    except Exception as exc:
        report_internal_error(exc, "checking whether a connection was inherited")
        return False
    if done:
        logger.warning(
            "pid %d: %s: a %s connection this process inherited from its parent (pid %d, "
            "which still has its socket open) was neutralised: it is the parent's session "
            "(using it here fails at once; a pool replaces it). Track it in the parent "
            "before the fork, or open it after.", os.getpid(), what, driver.name, os.getppid(),
        )
    return done


#: Connections this process inherited and neutralised: an error on one of them is explained
#: as that (`was_neutralised`), not as an idle timeout. Written in the child's reset only.
_NEUTRALISED: weakref.WeakSet[Any] = weakref.WeakSet()


def _note_neutralised(raw: object) -> None:
    with contextlib.suppress(TypeError):  # not weak-referenceable: explained as before
        _NEUTRALISED.add(raw)


def was_neutralised(conn: object) -> bool:
    """Whether ``conn`` (or the DBAPI connection it wraps) is one this process inherited and
    forksafe neutralised."""
    try:
        return unwrap(conn) in _NEUTRALISED
    except TypeError:
        return False


def _neutralise_recorded(entry: ConnectionEntry | None, name: str, exc: Exception) -> bool:
    """The driver could not tell the socket: use the descriptor recorded at track time if it
    is provably still the same socket, else report the failure."""
    recorded = entry.fd if entry is not None else None
    if entry is None or recorded is None or entry.socket is None:
        report_internal_error(exc, f"finding the socket of an inherited {name} connection "
                                   "(it is kept alive, never closed)")
        return False
    if _sockets.socket_identity(recorded) != entry.socket:
        # The socket recorded at track time is gone (a thread of the parent was closing the
        # connection as the process forked, or the server dropped it): nothing of this
        # connection is shared any more, and the number may belong to something else now.
        logger.warning("pid %d: the %s driver could not tell an inherited connection's "
                       "socket (%r), and the descriptor %d recorded when it was tracked is no "
                       "longer that socket: left alone", os.getpid(), name, exc, recorded)
        return False
    # mysqlclient, for one, refuses fileno() on a connection that another thread was using
    # when the process forked; that thread does not exist here.
    logger.warning("pid %d: the %s driver could not tell an inherited connection's "
                   "socket (%r); neutralised descriptor %d, recorded when it was tracked and "
                   "still the same socket", os.getpid(), name, exc, recorded)
    return _sockets.neutralise_fd(recorded)


def _before_fork() -> None:
    hold_for_fork()  # never raises; takes no lock, so nothing can delay the fork


def _after_fork_in_parent() -> None:
    release_holds()


def _after_fork_in_child() -> None:
    try:
        reinit_locks()  # single-threaded here: every forksafe lock becomes a fresh one
        after_fork()
    except BaseException as exc:  # pragma: no cover - after_fork never raises
        report_internal_error(exc, "the at-fork hook")
    finally:
        # only now, with every inherited socket neutralised, may the objects be freed
        release_all_holds()


def install_os_hooks() -> None:
    """Register with ``os.register_at_fork`` (once per interpreter; it cannot be undone)."""
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )

