"""Django integration: ``"forksafe.django"`` in ``INSTALLED_APPS``.

After a fork, in the child (gunicorn ``preload_app`` workers, uWSGI workers with
``import = forksafe.uwsgi``, multiprocessing, Celery prefork), every database connection
Django opened in the parent, in any thread, is neutralised (its socket replaced so nothing
the child does can reach the parent's session), and the forking thread's aliases drop
theirs, so the child opens its own; the parent keeps its connections. Django 5.1+'s
PostgreSQL pool (``OPTIONS["pool"]``) is dropped the same way and recreated on first use.

How: on ``connection_created`` each new DBAPI connection is added to forksafe's registry,
so the core's fork handling protects it like any tracked connection (held across the fork,
neutralised by the one neutralise function), whichever thread's ``connections`` it lives
in. The same signal asks the server its idle limit, once per server connection (a pooled
connection is asked at its first checkout only), leaving its transaction state untouched.

A child forked inside ``transaction.atomic()`` gets a new connection *outside* the block:
what it writes commits on its own. forksafe logs a warning in such a child.

For workers that serve no HTTP (a queue consumer, a management command, a scheduler),
wrap each unit of work in `unit_of_work` (a context manager and a decorator): it does what
Django does around a request (``close_old_connections``) and, unlike Django, also knows how
long a connection sat idle, so a connection the server has dropped (MySQL ``wait_timeout``,
PostgreSQL ``idle_session_timeout``) is replaced before use even with
``CONN_MAX_AGE=None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable
from contextlib import ContextDecorator
from types import TracebackType
from typing import Any, TypeVar, overload

try:
    import django  # noqa: F401 - the install hint below is for this import
    from django.conf import settings
    from django.db import DatabaseError, close_old_connections, connections
    from django.db.backends.signals import connection_created
except ImportError as _err:  # pragma: no cover - exercised by users without Django
    raise ImportError(
        "forksafe.django requires Django: pip install 'forksafe[django]'"
    ) from _err

from forksafe import _fork
from forksafe import retry as _retry
from forksafe._idle_limit import (
    DEFAULT_IDLE_CHECK,
    RETIRE_FRACTION,
    pg_transaction_status,
    rollback_if_opened,
    server_idle_limit,
)
from forksafe._registry import REGISTRY, ConnectionEntry
from forksafe.drivers import find_driver, unwrap

__all__ = [
    "DEFAULT_IDLE_CHECK",
    "UnitOfWork",
    "install",
    "reset_connections_in_child",
    "retry_on_disconnect",
    "unit_of_work",
]

logger = logging.getLogger("forksafe")

F = TypeVar("F", bound=Callable[..., Any])

# Keyed weakly by the driver's connection (one server connection; with Django's pool the
# same object comes back at every checkout): the server's idle limit (None: it has none,
# or it could not be read), and when the last unit of work on it ended. No lock: each use
# is one get, set or pop of a dict (atomic), never an iteration, and nothing here can be
# found half-done by a forked child.
_LIMITS: weakref.WeakKeyDictionary[Any, float | None] = weakref.WeakKeyDictionary()
_LAST_USED: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
# Old objects a child must never finalise (unknown drivers, pools whose threads are gone).
_ORPHANS: list[Any] = []
_INSTALLED = False
_UNSET: Any = object()


# -- fork ----------------------------------------------------------------------------------
def _track(raw: Any, origin: str, pid: int) -> None:
    """Add a DBAPI connection to forksafe's registry (a no-op if it is there already)."""
    conn = unwrap(raw)
    driver = find_driver(conn)
    if driver is None:
        return
    REGISTRY.add_connection(conn, ConnectionEntry(driver=driver, pid=pid, origin=origin))


def _postgresql_pools() -> dict[str, Any]:
    """Django 5.1+ keeps psycopg pools on the PostgreSQL wrapper class, by alias."""
    module = sys.modules.get("django.db.backends.postgresql.base")
    pools = getattr(getattr(module, "DatabaseWrapper", None), "_connection_pools", None)
    return pools if isinstance(pools, dict) else {}


def track_inherited_in_child() -> None:
    """Add to the registry, as inherited, what ``connection_created`` did not see.

    Runs in a child before forksafe's reset, so that the reset neutralises these too: a
    connection opened before ``forksafe.django`` was installed, and the idle connections of
    Django's PostgreSQL pools (opened by the pool, never checked out).
    """
    if not settings.configured:  # no settings were loaded, so no connection exists
        return
    parent = _fork.current_pid()  # still the parent's pid: the reset has not run yet
    for wrapper in connections.all(initialized_only=True):
        if wrapper.connection is not None:
            _track(wrapper.connection, f"Django alias {wrapper.alias!r}", parent)
    for alias, pool in list(_postgresql_pools().items()):
        for conn in list(getattr(pool, "_pool", ())):
            _track(conn, f"Django pool {alias!r}", parent)


def _warn_forked_in_atomic(wrapper: Any) -> None:
    logger.warning(
        "process %d was forked inside transaction.atomic() on database alias %r. "
        "The transaction stays the parent's; this process gets a new connection outside "
        "any atomic block, so what it writes commits on its own and is kept even if the "
        "parent's block rolls back. Fork outside atomic(), or give the child only work "
        "that may commit independently.",
        os.getpid(), wrapper.alias,
    )


def _drop(wrapper: Any) -> None:
    """Forget an inherited connection without a byte on the wire (child only).

    Its socket was neutralised by forksafe's reset (the registry had it); the object is
    kept alive anyway, so no finaliser of an unknown driver can run.
    """
    raw = wrapper.connection
    if raw is not None:
        if wrapper.in_atomic_block:
            _warn_forked_in_atomic(wrapper)
        _ORPHANS.append(raw)
    wrapper.connection = None
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.run_on_commit = []
    wrapper.errors_occurred = False
    wrapper.health_check_done = False


def _drop_postgresql_pools() -> None:
    """Forget inherited pools: their worker threads did not survive the fork; never close."""
    pools = _postgresql_pools()
    for alias, pool in list(pools.items()):
        _ORPHANS.append(pool)
        pools.pop(alias, None)


def reset_connections_in_child() -> None:
    """Drop every alias's inherited connection, and the PostgreSQL pools (after the reset).

    The sockets themselves were neutralised by forksafe's reset. Safe to call in any
    process: in the parent it would drop live connections, so it is only registered as an
    after-fork callback, which runs in children only.
    """
    if not settings.configured:  # no settings were loaded, so no connection exists
        return
    for wrapper in connections.all(initialized_only=True):
        try:
            _drop(wrapper)
        except Exception as exc:
            _fork.report_internal_error(exc, f"dropping Django connection {wrapper.alias!r}")
    try:
        _drop_postgresql_pools()
    except Exception as exc:
        _fork.report_internal_error(exc, "dropping Django's PostgreSQL connection pools")


# -- on connect --------------------------------------------------------------------------
def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Track the new DBAPI connection; ask its idle limit once per server connection."""
    raw = connection.connection
    if raw is None:
        return
    if raw in _LIMITS:  # a pooled connection checked out again: known already
        return
    try:
        _track(raw, f"Django alias {connection.alias!r}", os.getpid())
    except Exception as exc:  # never fail a connect over forksafe's bookkeeping
        _fork.report_internal_error(exc, f"tracking Django connection {connection.alias!r}")
    limit: float | None = None
    try:
        limit = server_idle_limit(connection.vendor, raw)
    except Exception as exc:  # never fail a connect over an optimisation
        logger.debug("forksafe: could not read the idle limit of %r: %r", connection.alias, exc)
    with contextlib.suppress(TypeError):  # a connection that cannot be weakly referenced
        _LIMITS[raw] = limit


def install() -> None:
    """Register forksafe's after-fork reset and the connect-time tracking (idempotent).

    Runs on import of ``forksafe.django`` (and so from ``INSTALLED_APPS``).
    """
    global _INSTALLED  # noqa: PLW0603 - a once-only flag
    if _INSTALLED:
        return
    _fork.register_child_callback(track_inherited_in_child, phase=_fork.BEFORE_RESET)
    _fork.register_child_callback(reset_connections_in_child)
    connection_created.connect(
        _on_connection_created, weak=False, dispatch_uid="forksafe.django.idle_limit"
    )
    _INSTALLED = True


# -- non-HTTP workers ----------------------------------------------------------------------
def _close(wrapper: Any) -> None:
    try:
        wrapper.close()
    except DatabaseError:
        wrapper.connection = None


def _lookup(table: weakref.WeakKeyDictionary[Any, Any], raw: Any) -> Any:
    try:
        return table.get(raw)
    except TypeError:  # a connection that cannot be weakly referenced (sqlite3)
        return None


def _retire_idle(idle_check: float | None) -> None:
    now = time.monotonic()
    for wrapper in connections.all(initialized_only=True):
        raw = wrapper.connection
        if raw is None or wrapper.in_atomic_block:
            continue
        used = _lookup(_LAST_USED, raw)
        if used is None:
            continue
        idle = now - used
        limit = _lookup(_LIMITS, raw)
        if limit is not None and idle >= limit * RETIRE_FRACTION:
            logger.debug("forksafe: %r idle %.1fs, past the server's limit; closing it",
                         wrapper.alias, idle)
            _close(wrapper)
        elif idle_check is not None and idle >= idle_check and not _is_usable(wrapper):
            _close(wrapper)


def _is_usable(wrapper: Any) -> bool:
    """Django's ``is_usable()``, leaving no transaction open behind it.

    On PostgreSQL outside autocommit mode (``AUTOCOMMIT=False``) its ``SELECT 1`` opens a
    transaction, and under REPEATABLE READ takes the snapshot the job would then see.
    """
    raw = wrapper.connection
    before = pg_transaction_status(raw) if wrapper.vendor == "postgresql" else None
    usable = bool(wrapper.is_usable())
    if usable and before is not None:
        rollback_if_opened(raw, before)
    return usable


def _stamp() -> None:
    now = time.monotonic()
    for wrapper in connections.all(initialized_only=True):
        raw = wrapper.connection
        if raw is not None:
            with contextlib.suppress(TypeError):  # cannot be weakly referenced
                _LAST_USED[raw] = now


class UnitOfWork(ContextDecorator):
    """What `unit_of_work` returns: a context manager that is also a decorator."""

    def __init__(self, idle_check: float | None = DEFAULT_IDLE_CHECK) -> None:
        self.idle_check = idle_check

    def __enter__(self) -> UnitOfWork:
        _retire_idle(self.idle_check)
        close_old_connections()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        close_old_connections()
        _stamp()


@overload
def unit_of_work(fn: F, /) -> F: ...
@overload
def unit_of_work(idle_check: float | None = DEFAULT_IDLE_CHECK, /) -> UnitOfWork: ...
@overload
def unit_of_work(*, idle_check: float | None = DEFAULT_IDLE_CHECK) -> UnitOfWork: ...


def unit_of_work(fn_or_idle_check: Any = _UNSET, /, *, idle_check: Any = _UNSET) -> Any:
    """Around one job of a non-HTTP worker: what Django does around a request, and more.

    ::

        for message in consumer:
            with forksafe.django.unit_of_work():
                handle(message)

    or ``@forksafe.django.unit_of_work`` (with or without parentheses) on the handler.
    Before the job: connections that sat idle past 90% of the server's idle limit (learned
    on connect) are closed, ones idle over ``idle_check`` seconds are checked
    (``is_usable()``) and closed if dead, then Django's ``close_old_connections()``
    (``CONN_MAX_AGE``, errors) runs. After the job: ``close_old_connections()`` again, and
    the idle clock starts.

    Args:
        idle_check: seconds of idleness after which a connection is checked before use
            (default 10); None checks only against the server's idle limit.

    Returns:
        A `UnitOfWork` (``with`` it, or decorate with it); given a function (the bare
        decorator), that function wrapped.
    """
    if callable(fn_or_idle_check):  # the bare decorator: @unit_of_work
        if idle_check is not _UNSET:
            raise TypeError("unit_of_work(fn, idle_check=...): use "
                            "@unit_of_work(idle_check=...) to set idle_check")
        return UnitOfWork()(fn_or_idle_check)
    if fn_or_idle_check is not _UNSET and idle_check is not _UNSET:
        raise TypeError("unit_of_work() got idle_check twice")
    for given in (fn_or_idle_check, idle_check):
        if given is not _UNSET:
            return UnitOfWork(given)
    return UnitOfWork()


def _close_broken() -> None:
    for wrapper in connections.all(initialized_only=True):
        if wrapper.connection is not None and not wrapper.in_atomic_block:
            with contextlib.suppress(Exception):
                if wrapper.errors_occurred and not wrapper.is_usable():
                    _close(wrapper)


def retry_on_disconnect(
    fn: F | None = None,
    /,
    *,
    attempts: int = 5,
    backoff: float = 0.1,
    max_backoff: float = 2.0,
    timeout: float = 30.0,
) -> Any:
    """`forksafe.retry_on_disconnect` for Django: broken connections are closed between tries.

    Use it outside ``transaction.atomic()`` (the atomic block goes inside the function): a
    disconnect during Django's COMMIT raises `forksafe.CommitUnknownError`, never a rerun.
    """
    decorator = _retry.retry_on_disconnect(
        attempts=attempts,
        backoff=backoff,
        max_backoff=max_backoff,
        timeout=timeout,
        before_retry=_close_broken,
    )
    return decorator(fn) if fn is not None else decorator


install()
