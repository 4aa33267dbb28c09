"""gunicorn integration: ``from forksafe.gunicorn import post_fork`` in gunicorn.conf.py.

gunicorn runs every top-level name of gunicorn.conf.py that matches a setting, and checks a
``post_fork`` hook has exactly two positional parameters ``(server, worker)``. gunicorn forks
with ``os.fork``, so forksafe's at-fork hook already resets the worker; this hook makes the
protection explicit in the config, and survives setups where the at-fork hook is not
installed yet (forksafe imported only by the app, after a fork, with ``preload_app`` off).

If you already have a ``post_fork``, chain it::

    from forksafe.gunicorn import chain

    @chain
    def post_fork(server, worker):
        server.log.info("worker %s up", worker.pid)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from forksafe import _fork

__all__ = ["chain", "post_fork"]

Hook = Callable[[Any, Any], object]


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn ``post_fork`` hook: reset forksafe-tracked connections in the new worker.

    Never raises: a raising ``post_fork`` makes gunicorn halt the whole server.
    """
    try:
        _fork.after_fork()
    except Exception as exc:  # pragma: no cover - after_fork never raises
        _fork.report_internal_error(exc, "gunicorn post_fork")


def chain(hook: Hook) -> Hook:
    """Return a ``post_fork(server, worker)`` that runs forksafe's reset, then ``hook``.

    Args:
        hook: your own ``post_fork(server, worker)``.

    Raises:
        TypeError: if ``hook`` does not take exactly ``(server, worker)``, which gunicorn
            would reject at start-up anyway.
    """
    if not callable(hook):
        raise TypeError(f"forksafe.gunicorn.chain needs a function, got {type(hook).__name__}")
    params = [
        p
        for p in inspect.signature(hook).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) != 2:
        raise TypeError(
            f"{getattr(hook, '__qualname__', hook)!r} must take exactly (server, worker), "
            "as gunicorn requires of post_fork"
        )

    def chained(server: Any, worker: Any) -> None:
        try:
            _fork.after_fork()
        except Exception as exc:  # pragma: no cover - after_fork never raises
            _fork.report_internal_error(exc, "gunicorn post_fork")
        hook(server, worker)

    chained.__wrapped__ = hook  # type: ignore[attr-defined]
    chained.__name__ = getattr(hook, "__name__", "post_fork")
    chained.__doc__ = hook.__doc__
    return chained
