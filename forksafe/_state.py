"""The one home of fork-time state: the current pid, internal errors, locks and fork holds.

Everything here is safe to find in any state in a forked child, and imports nothing else of
forksafe but its exceptions, so every other module may import it (no cycles).

* **The current pid** (`current_pid`): the pid whose connections forksafe considers its
  own. ``forksafe._fork`` writes it as the last step of a reset.
* **This process's pid without a system call** (`fork_mark`, `OWN`, `own_pid`): one byte
  of a page the kernel zeroes in every child (``madvise(MADV_WIPEONFORK)``), beside the pid
  that wrote it. While the byte reads 1, ``OWN.pid`` is this process's pid: no fork since,
  whichever way the process was forked (``os.fork``, uWSGI's C ``fork()``, ctypes). Used by
  the pool check at every checkout, where ``os.getpid()`` is a system call.
* **Internal errors** (`report_internal_error`, `internal_errors`): fork-time code never
  raises into the host server; what it caught is logged and kept here for tests.
* **Fork-aware locks** (`ForkLock`): every lock that fork-time code can take. A fork copies a
  lock in whatever state it is; a lock held by another thread at the moment of ``fork()`` is
  held for ever in the child, where that thread does not exist. Each `ForkLock` is replaced
  by a fresh one in the child by the ``os.register_at_fork`` child hook (`reinit_locks`),
  where the child is still single-threaded. For a fork no Python hook saw (uWSGI forks in
  C, ``fork(2)`` called through ctypes), an ``acquire`` in a process other than the lock's
  own waits `LOCK_TIMEOUT` seconds, then replaces the lock (its holder cannot exist here)
  and reports `ChildDeadlockedError`. The lock released is always the very object acquired,
  even when another thread replaced it meanwhile.
* **Fork holds** (`hold_for_fork`, `release_holds`): strong references to every connection
  forksafe knows of, taken in the parent just before ``fork()`` (and, by `hold_late`, to
  one another thread makes between that moment and the fork itself). In the child, CPython frees
  the states of the threads that did not fork (and their ``threading.local`` data) *before*
  any at-fork hook runs; a connection held only there would be finalised (mysqlclient sends
  ``COM_QUIT`` from its destructor) before forksafe could neutralise its socket. Held here,
  it survives until the child has neutralised it; the parent drops the hold right after
  the fork.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import sysconfig
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from forksafe.exceptions import ChildDeadlockedError

__all__ = [
    "LOCK_TIMEOUT",
    "OWN",
    "ForkLock",
    "current_pid",
    "fork_mark",
    "hold_for_fork",
    "hold_late",
    "internal_errors",
    "own_pid",
    "register_hold_source",
    "reinit_locks",
    "release_all_holds",
    "release_holds",
    "report_internal_error",
    "weak_items",
    "weak_keys",
]

logger = logging.getLogger("forksafe")

#: Seconds a child of a fork no hook saw waits for a lock before it replaces it.
LOCK_TIMEOUT = 5.0


class _Process:
    __slots__ = ("pid", "resets")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.resets = 0


PROCESS = _Process()
_INTERNAL_ERRORS: deque[BaseException] = deque(maxlen=100)


def current_pid() -> int:
    """The pid whose connections forksafe considers current (cheap; no syscall)."""
    return PROCESS.pid


# -- this process's pid without a system call --------------------------------------------------
class _Own:
    __slots__ = ("mark", "pid", "trusted")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.mark: Any = None  # the memoryview of the wiped page, or a bytearray reading 0
        self.trusted = False  # the kernel clears the page in children


#: ``OWN.pid``: the pid `own_pid` last read; this process's own while `fork_mark` reads 1.
OWN = _Own()

# Linux's MADV_WIPEONFORK (4.14+; the generic value, which x86, arm, powerpc, s390 and
# riscv use; Python's mmap module does not name it).
_MADV_WIPEONFORK = 18
_MARK_LOCK = threading.Lock()


def fork_mark() -> Any:
    """A byte that reads 1 while ``OWN.pid`` is this process's pid, else 0.

    Made at the first call (about a millisecond: ``/proc/self/smaps`` is read once to see
    the kernel took the advice), then always the same object; index it (``mark[0]``). It is
    one byte of a private page marked ``MADV_WIPEONFORK``: the kernel gives every child a
    zeroed copy, whatever made the child (a fork no Python hook saw included), so a byte
    that reads 1 was written by this very process (`own_pid` writes it). Where the kernel
    cannot do it (not Linux, Linux before 4.14, a sandbox that ignores the advice, a build
    without the GIL) it is a byte that always reads 0, and callers ask ``os.getpid()``.
    """
    mark = OWN.mark
    if mark is not None:
        return mark
    with _MARK_LOCK:
        if OWN.mark is None:
            page = _wiped_page()
            if page is None:
                OWN.mark = bytearray(1)
            else:
                OWN.mark = memoryview(page)
                OWN.trusted = True
                own_pid()
        return OWN.mark


def own_pid() -> int:
    """``os.getpid()``, remembered in ``OWN.pid`` and vouched for by `fork_mark`."""
    pid = os.getpid()
    OWN.pid = pid
    if OWN.trusted:
        OWN.mark[0] = 1  # after OWN.pid: a thread that sees 1 sees this pid
    return pid


def check_fork_mark() -> None:
    """In a child (the reset calls it): the mark must read 0 here unless this process
    wrote it. If the kernel did not clear it, it is never trusted again (every check asks
    ``os.getpid()``)."""
    if OWN.trusted and OWN.mark[0] and OWN.pid != os.getpid():
        OWN.trusted = False
        OWN.mark[0] = 0
        logger.warning("the kernel did not clear forksafe's wipe-on-fork page in pid %d: "
                       "the pid is checked with os.getpid() from now on", os.getpid())


def _wiped_page() -> mmap.mmap | None:
    """A private anonymous page the kernel zeroes in every child, or None."""
    if not sys.platform.startswith("linux") or sysconfig.get_config_var("Py_GIL_DISABLED"):
        # Without a GIL another thread could see the mark's 1 before OWN.pid's new value.
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        page.madvise(_MADV_WIPEONFORK)
        # The kernel lists the flag as "wf"; an emulation that accepted the advice without
        # taking it does not.
        if b"wf" not in vm_flags(page):
            raise OSError("no wf flag")
    except Exception:  # any doubt: the pid is checked by a system call
        page.close()
        return None
    return page


def vm_flags(page: mmap.mmap) -> list[bytes]:
    """The kernel's ``VmFlags`` for the mapping that holds ``page`` (``/proc/self/smaps``)."""
    view = ctypes.c_char.from_buffer(page)
    address = ctypes.addressof(view)
    del view
    with open("/proc/self/smaps", "rb") as smaps:
        data = smaps.read()
    start = data.find(b"\n%x-" % address)
    if start < 0 and data.startswith(b"%x-" % address):
        start = 0
    flags_at = data.find(b"\nVmFlags:", start) if start >= 0 else -1
    if flags_at < 0:
        raise OSError(f"mapping {address:x} not listed in /proc/self/smaps")
    return data[flags_at + 9:data.find(b"\n", flags_at + 1)].split()


def internal_errors() -> list[BaseException]:
    """Errors that fork-time code caught and logged instead of raising, in this process."""
    return list(_INTERNAL_ERRORS)


def report_internal_error(exc: BaseException, what: str = "") -> None:
    """Log an error that must not reach the host server, and remember it for tests."""
    _INTERNAL_ERRORS.append(exc)
    if what:
        logger.error("%s failed in pid %d: %r", what, os.getpid(), exc, exc_info=exc)
    else:
        logger.error("%s", exc)


# -- locks ------------------------------------------------------------------------------------
_LOCKS: weakref.WeakSet[ForkLock] = weakref.WeakSet()


class ForkLock:
    """A lock (optionally re-entrant) that a forked child can always take.

    Use it as ``with lock:``, or ``token = lock.acquire()`` ... ``lock.release(token)``.
    See the module docstring for how it survives a fork.

    Args:
        name: what the lock guards, for the message when a child has to replace it.
        reentrant: an ``RLock`` rather than a ``Lock``.
    """

    __slots__ = ("__weakref__", "_factory", "_fresh", "_held", "_lock", "_name", "_pid")

    def __init__(self, name: str, *, reentrant: bool = False) -> None:
        self._name = name
        self._factory: Callable[[], Any] = threading.RLock if reentrant else threading.Lock
        self._lock: Any = self._factory()
        self._pid = os.getpid()
        # pid -> the replacement every thread of that process agrees on (dict.setdefault is
        # atomic), so two threads that time out together take the same new lock
        self._fresh: dict[int, Any] = {}
        self._held = threading.local()  # per thread: the stack of objects `with` acquired
        _LOCKS.add(self)

    def acquire(self) -> Any:
        """Take the lock; return the token (the lock object taken) to give to `release`."""
        lock = self._lock
        if lock.acquire(timeout=LOCK_TIMEOUT):
            return lock
        while True:
            pid = os.getpid()
            if pid != self._pid:
                # A fork no hook saw: the holder may be a thread that does not exist here.
                fresh = self._fresh.setdefault(pid, self._factory())
                if self._lock is lock:
                    self._lock = fresh
                    self._pid = pid
                    for other in [p for p in self._fresh if p != pid]:
                        self._fresh.pop(other, None)
                    report_internal_error(ChildDeadlockedError(
                        f"forksafe's {self._name} lock was held across a fork (pid {pid}); "
                        "replacing it. Import forksafe.uwsgi or call forksafe.after_fork() "
                        "in your server's post-fork hook so the fork is seen."
                    ))
            lock = self._lock
            if lock.acquire(timeout=LOCK_TIMEOUT):
                return lock

    @staticmethod
    def release(token: Any) -> None:
        """Release what `acquire` returned (the very lock taken, even if since replaced)."""
        token.release()

    def __enter__(self) -> ForkLock:
        token = self.acquire()
        stack = getattr(self._held, "stack", None)
        if stack is None:
            stack = self._held.stack = []
        stack.append(token)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._held.stack.pop().release()

    def _reinit(self) -> None:
        self._lock = self._factory()
        self._pid = os.getpid()
        self._fresh = {}


def reinit_locks() -> None:
    """Give every `ForkLock` a fresh, free lock (the at-fork child hook; single-threaded).

    A ``with`` block of the forking thread that was inside a lock at fork time still
    releases the object it took, which is harmless.
    """
    for lock in list(_LOCKS):
        lock._reinit()


# -- fork holds -------------------------------------------------------------------------------
_HOLD_SOURCES: list[Callable[[], Iterable[Any]]] = []
# Per forking thread (two threads may fork at once): what its before-fork hook holds.
_HOLDS: dict[int, list[Any]] = {}


def weak_keys(mapping: weakref.WeakKeyDictionary[Any, Any]) -> list[Any]:
    """The live keys of a ``WeakKeyDictionary``, without a lock and without iterating it.

    One ``dict.copy()`` of its underlying dict of weak references is atomic in CPython, so
    no other thread's update can break it (iterating the mapping itself could).
    """
    refs: dict[Any, Any] = vars(mapping)["data"]
    return [key for ref in refs.copy() if (key := ref()) is not None]


def weak_items(mapping: weakref.WeakKeyDictionary[Any, Any]) -> list[tuple[Any, Any]]:
    """The live items of a ``WeakKeyDictionary``, like `weak_keys`."""
    refs: dict[Any, Any] = vars(mapping)["data"]
    return [(key, value) for ref, value in refs.copy().items() if (key := ref()) is not None]


def register_hold_source(source: Callable[[], Iterable[Any]]) -> None:
    """Add a function listing objects to keep alive across each fork (idempotent)."""
    if source not in _HOLD_SOURCES:
        _HOLD_SOURCES.append(source)


def hold_for_fork() -> None:
    """Take strong references to what every source lists (the before-fork hook)."""
    held: list[Any] = []
    for source in list(_HOLD_SOURCES):
        try:
            held.extend(source())
        except Exception as exc:  # never break os.fork()
            report_internal_error(exc, f"listing connections to hold across fork ({source!r})")
    _HOLDS[threading.get_ident()] = held


def hold_late(obj: Any) -> None:
    """Keep ``obj`` alive across a fork that is already under way in another thread.

    A forking thread's before-fork hook lists what to hold, then ``os.fork()`` may still
    wait (for the import lock another thread holds) while other threads run: a connection
    opened, or a pooled one checked out, in that window was not listed. Whatever makes one
    calls this; it joins every hold under way (the parent drops it with the forking
    thread's own, the child once its reset is done), and does nothing when no fork is.
    The tracked pool's checkout tests ``_HOLDS`` itself first, to save the call.
    """
    for held in list(_HOLDS.values()):
        held.append(obj)


def release_holds() -> None:
    """Drop the references `hold_for_fork` took: in the parent, this thread's, right after
    its fork; in the child (the forking thread is its only thread), all of them."""
    _HOLDS.pop(threading.get_ident(), None)


def release_all_holds() -> None:
    """The child's release, once every inherited socket is neutralised."""
    _HOLDS.clear()
