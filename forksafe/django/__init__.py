"""Django integration: ``"forksafe.django"`` in ``INSTALLED_APPS``.

After a fork, in the child (gunicorn ``preload_app`` workers, uWSGI workers with
``import = forksafe.uwsgi``, multiprocessing, Celery prefork), every database alias's
inherited connection is neutralised (its socket replaced so nothing the child does can
reach the parent's session) and dropped, so the child opens its own; the parent keeps its
connections. Django 5.1+'s PostgreSQL pool (``OPTIONS["pool"]``) is dropped the same way
and recreated on first use.

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
import sys
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import ContextDecorator
from types import TracebackType
from typing import Any, TypeVar

try:
    import django  # noqa: F401 - the install hint below is for this import
    from django.db import DatabaseError, close_old_connections, connections
    from django.db.backends.signals import connection_created
except ImportError as _err:  # pragma: no cover - exercised by users without Django
    raise ImportError(
        "forksafe.django requires Django: pip install 'forksafe[django]'"
    ) from _err

from forksafe import _fork, _sockets
from forksafe import retry as _retry
from forksafe._idle_limit import DEFAULT_IDLE_CHECK, RETIRE_FRACTION, server_idle_limit
from forksafe.drivers import find_driver, unwrap

__all__ = [
    "DEFAULT_IDLE_CHECK",
    "install",
    "reset_connections_in_child",
    "retry_on_disconnect",
    "unit_of_work",
]

logger = logging.getLogger("forksafe")

F = TypeVar("F", bound=Callable[..., Any])


# Per connection wrapper: (id of the DBAPI connection, when the last unit of work ended)
# and (id of the DBAPI connection, the server's idle limit in seconds). Keyed weakly by the
# wrapper; the id ties an entry to one DBAPI connection, so a reconnect invalidates it.
_LAST_USED: weakref.WeakKeyDictionary[Any, tuple[int, float]] = weakref.WeakKeyDictionary()
_LIMITS: weakref.WeakKeyDictionary[Any, tuple[int, float]] = weakref.WeakKeyDictionary()
_STATE_LOCK = threading.Lock()
# Old objects a child must never finalise (unknown drivers, pools whose threads are gone).
_ORPHANS: list[Any] = []
_INSTALLED = False


# -- fork ----------------------------------------------------------------------------------
def _neutralise(raw: Any) -> None:
    conn = unwrap(raw)
    driver = find_driver(conn)
    if driver is None:
        _ORPHANS.append(conn)  # cannot neutralise it: at least never let it be finalised
        return
    try:
        fd = driver.socket_fd(conn)
    except Exception:  # already closed: nothing shared any more
        return
    if fd is not None:
        _sockets.neutralise_fd(fd)


def _drop(wrapper: Any) -> None:
    """Forget an inherited connection without a byte on the wire (child only)."""
    raw = wrapper.connection
    if raw is not None:
        _neutralise(raw)
        _ORPHANS.append(raw)  # its socket is a dummy now; keep finalisers quiet anyway
    wrapper.connection = None
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.run_on_commit = []
    wrapper.errors_occurred = False
    wrapper.health_check_done = False
    _LAST_USED.pop(wrapper, None)
    _LIMITS.pop(wrapper, None)


def _drop_postgresql_pools() -> None:
    """Django 5.1+ keeps psycopg pools on the PostgreSQL wrapper class; drop inherited ones."""
    module = sys.modules.get("django.db.backends.postgresql.base")
    pools = getattr(getattr(module, "DatabaseWrapper", None), "_connection_pools", None)
    if not pools:
        return
    for alias, pool in list(pools.items()):
        for conn in list(getattr(pool, "_pool", ())):
            _neutralise(conn)
        _ORPHANS.append(pool)  # its worker threads did not survive the fork: never close it
        pools.pop(alias, None)


def reset_connections_in_child() -> None:
    """Neutralise and drop every alias's inherited connection (run by forksafe's reset).

    Safe to call in any process: in the parent it would drop live connections, so it is
    only registered as an after-fork callback, which runs in children only.
    """
    for wrapper in connections.all(initialized_only=True):
        try:
            _drop(wrapper)
        except Exception as exc:
            _fork.report_internal_error(exc, f"dropping Django connection {wrapper.alias!r}")
    try:
        _drop_postgresql_pools()
    except Exception as exc:
        _fork.report_internal_error(exc, "dropping Django's PostgreSQL connection pools")


# -- idle limit --------------------------------------------------------------------------
def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Ask the server its idle limit once per new connection (no cost per unit of work)."""
    raw = connection.connection
    try:
        # no rollback: Django set the connection's autocommit mode before this signal
        limit = server_idle_limit(connection.vendor, raw, rollback=False)
    except Exception as exc:  # never fail a connect over an optimisation
        logger.debug("forksafe: could not read the idle limit of %r: %r", connection.alias, exc)
        return
    if limit is not None:
        with _STATE_LOCK:
            _LIMITS[connection] = (id(raw), limit)


def install() -> None:
    """Register forksafe's after-fork reset and idle-limit probe (idempotent).

    Runs on import of ``forksafe.django`` (and so from ``INSTALLED_APPS``).
    """
    global _INSTALLED  # noqa: PLW0603 - a once-only flag
    if _INSTALLED:
        return
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


def _retire_idle(idle_check: float | None) -> None:
    now = time.monotonic()
    for wrapper in connections.all(initialized_only=True):
        raw = wrapper.connection
        if raw is None or wrapper.in_atomic_block:
            continue
        with _STATE_LOCK:
            used = _LAST_USED.get(wrapper)
            limit = _LIMITS.get(wrapper)
        if used is None or used[0] != id(raw):
            continue
        idle = now - used[1]
        if limit is not None and limit[0] == id(raw) and idle >= limit[1] * RETIRE_FRACTION:
            logger.debug("forksafe: %r idle %.1fs, past the server's limit; closing it",
                         wrapper.alias, idle)
            _close(wrapper)
        elif idle_check is not None and idle >= idle_check and not wrapper.is_usable():
            _close(wrapper)


def _stamp() -> None:
    now = time.monotonic()
    for wrapper in connections.all(initialized_only=True):
        if wrapper.connection is not None:
            with _STATE_LOCK:
                _LAST_USED[wrapper] = (id(wrapper.connection), now)


class unit_of_work(ContextDecorator):  # noqa: N801 - used like a function
    """Around one job of a non-HTTP worker: what Django does around a request, and more.

    ::

        for message in consumer:
            with forksafe.django.unit_of_work():
                handle(message)

    or ``@forksafe.django.unit_of_work()`` on the handler. Before the job: connections that
    sat idle past 90% of the server's idle limit (learned on connect) are closed, ones idle
    over ``idle_check`` seconds are checked (``is_usable()``) and closed if dead, then
    Django's ``close_old_connections()`` (``CONN_MAX_AGE``, errors) runs. After the job:
    ``close_old_connections()`` again, and the idle clock starts.

    Args:
        idle_check: seconds of idleness after which a connection is checked before use;
            None checks only against the server's idle limit.
    """

    def __init__(self, idle_check: float | None = DEFAULT_IDLE_CHECK) -> None:
        self.idle_check = idle_check

    def __enter__(self) -> unit_of_work:
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
