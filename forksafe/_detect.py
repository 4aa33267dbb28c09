"""Detection after a fork: inherited connections and engines that nobody tracked.

In the child, before forksafe's reset, each object `forksafe.instrument` recorded (and, with
``configure(scan_at_fork=True)``, every driver connection and engine the garbage collector
knows of) that is not tracked is neutralised like a tracked one (an engine gets a fresh
pool) and reported once: a ``ForkSafetyWarning`` and a ``forksafe`` log record naming the
driver, where it was created and what was done. Strict mode then arms ``forksafe._strict``.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import warnings
from typing import Any

from forksafe import _fork, _strict
from forksafe._records import CONFIG, LOCK, SEEN, Origin
from forksafe._registry import REGISTRY
from forksafe.drivers import all_drivers, find_driver, unwrap
from forksafe.exceptions import ForkSafetyWarning

__all__ = ["connection_state", "scan_gc"]

logger = logging.getLogger("forksafe")


def connection_state(conn: Any, owner: int, pid: int) -> str:
    driver = find_driver(conn)
    try:
        fd = driver.socket_fd(conn) if driver is not None else None
    except Exception:  # the driver could not tell: not "closed" (see Driver.socket_fd)
        return "unknown"
    if fd is None:
        return "closed"
    if owner != pid:
        return "inherited"
    return "closed-by-server" if _peer_hung_up(fd) else "open"


def _peer_hung_up(fd: int) -> bool:
    """Whether the other end closed this socket: a zero-timeout poll (no byte sent, nothing
    read). A reply in flight to a query of another thread is not a hang-up (POLLIN alone)."""
    import select

    flags = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
    try:
        poller = select.poll()
        poller.register(fd, flags)
        events = poller.poll(0)
    except (OSError, ValueError):
        return False
    return any(mask & flags for _fd, mask in events)


def scan_gc() -> list[Any]:
    """Every live driver connection and Engine the garbage collector knows of."""
    from forksafe.drivers import _resolve

    classes: list[type] = []
    for driver in all_drivers():
        if driver.module in sys.modules:
            classes += [c for c in map(_resolve, driver.classes) if c is not None]
    if "sqlalchemy.engine.base" in sys.modules:
        classes.append(sys.modules["sqlalchemy.engine.base"].Engine)
    if not classes:
        return []
    wanted = tuple(classes)
    frozen = gc.get_freeze_count() > 0
    if frozen:  # gc.freeze() (forksafe's server hooks, or the app's) hides objects from
        gc.unfreeze()  # gc.get_objects(); both calls only relink lists
    try:
        return [obj for obj in gc.get_objects() if isinstance(obj, wanted)]
    finally:
        if frozen:
            gc.freeze()


def _untracked_inherited(pid: int) -> list[tuple[Any, str]]:
    """Inherited connections and engines that nobody tracked, with their descriptions."""
    tracked_conns, tracked_engines = REGISTRY.snapshot()
    tracked = {id(c) for c, _ in tracked_conns} | {id(e) for e, _ in tracked_engines}
    with LOCK:
        candidates = [(obj, origin) for obj, origin in SEEN.items() if origin.pid != pid]
    if CONFIG.scan_at_fork:
        known = {id(obj) for obj, _ in candidates}
        for obj in scan_gc():
            if id(obj) not in known:
                candidates.append((obj, Origin("<created before forksafe.instrument()>", 0, "")))
    engines: list[tuple[Any, Origin]] = []
    conns: list[tuple[Any, Origin]] = []
    for obj, origin in candidates:
        if id(obj) in tracked:
            continue
        is_conn = find_driver(obj) is not None
        (conns if is_conn else engines).append((obj, origin))
    found = []
    in_pools: set[int] = set()  # reported with their engine, not once more on their own
    for obj, origin in engines:
        pool_conns = _engine_inherited_connections(obj)
        in_pools.update(id(c) for c in pool_conns)
        if pool_conns:
            found.append((obj, f"SQLAlchemy engine created at {origin.site}"))
    for obj, origin in conns:
        driver = find_driver(obj)
        if driver is None or id(obj) in in_pools or connection_state(obj, -1, pid) == "closed":
            continue
        found.append((obj, f"{driver.name} connection created at {origin.site}"))
    return found


def _engine_inherited_connections(engine: Any) -> list[Any]:
    from forksafe.sqlalchemy import _idle_records, _record_connection

    out = []
    for record in _idle_records(engine.pool):
        conn = _record_connection(record)
        if conn is not None and find_driver(unwrap(conn)) is not None:
            out.append(unwrap(conn))
    return out


def _child_check() -> None:
    """Run in a child before forksafe's own reset: protect and report untracked objects."""
    pid = os.getpid()  # the pid being reset: after_fork runs in the process it resets
    _strict.PENDING.clear()  # what an ancestor found is not this process's business
    if not (len(SEEN) or CONFIG.scan_at_fork):
        return
    started = time.perf_counter()
    found = _untracked_inherited(pid)
    for obj, description in found:
        action = _protect(obj)
        message = (
            f"pid {pid} inherited a {description} that nobody tracked; {action}. "
            "Track it with forksafe.track(), or create it after the fork."
        )
        logger.warning("%s", message)  # the logger's name already says forksafe
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", ForkSafetyWarning)
                warnings.warn(f"forksafe: {message}", ForkSafetyWarning, stacklevel=2)
        except Exception as exc:  # warnings configured as errors: never raise at fork time
            _fork.report_internal_error(exc, "warning about an untracked connection")
        if CONFIG.strict:
            _strict.PENDING.append(description)
            _strict.poison(obj, description)
    if found:
        logger.debug("untracked-connection check took %.1f ms",
                     (time.perf_counter() - started) * 1000)


def _protect(obj: Any) -> str:
    if find_driver(obj) is not None:
        done = _fork.neutralise(obj)
        return ("its socket was neutralised: using it fails at once, the parent's session "
                "is untouched" if done else "it had no open socket")
    neutralised = sum(_fork.neutralise(conn) for conn in _engine_inherited_connections(obj))
    obj.dispose(close=False)
    return (f"its {neutralised} pooled connection(s) were neutralised and it got a fresh "
            "pool")


_fork.register_child_callback(_child_check, phase=_fork.BEFORE_RESET)
