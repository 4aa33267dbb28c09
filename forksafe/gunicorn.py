"""gunicorn integration: ``from forksafe.gunicorn import post_fork, pre_fork`` in gunicorn.conf.py.

gunicorn runs every top-level name of gunicorn.conf.py that matches a setting, and checks
that ``pre_fork`` and ``post_fork`` take exactly two positional parameters
``(server, worker)``. The two hooks:

* ``post_fork`` (in each new worker) resets forksafe-tracked connections. gunicorn forks
  with ``os.fork``, so forksafe's at-fork hook already does this; the hook makes the
  protection explicit in the config, and survives setups where the at-fork hook is not
  installed yet (forksafe imported only by the app, after a fork, with ``preload_app`` off);
* ``pre_fork`` (in the master, before each worker is forked) runs ``gc.freeze()`` once per
  fork generation (the first fork after start-up or after a reload), so that the garbage
  collector of the workers never writes to the pages of the preloaded app: with
  ``preload_app`` they stay shared after traffic. Without ``pre_fork`` in the config,
  ``post_fork`` freezes first thing in each worker instead (the same effect, as long as
  nothing between the fork and the hook collects). ``FORKSAFE_GC_FREEZE=0`` turns the
  freeze off; see `forksafe._gc_freeze` for what it costs.

If you already have these hooks, chain them (forksafe's part runs first)::

    from forksafe.gunicorn import chain, chain_pre_fork

    @chain
    def post_fork(server, worker):
        server.log.info("worker %s up", worker.pid)

    @chain_pre_fork
    def pre_fork(server, worker):
        ...
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable
from typing import Any

from forksafe import _fork, _gc_freeze

__all__ = ["chain", "chain_pre_fork", "post_fork", "pre_fork"]

Hook = Callable[[Any, Any], object]


def pre_fork(server: Any, worker: Any) -> None:
    """gunicorn ``pre_fork`` hook: ``gc.freeze()`` in the master, once per fork generation.

    A generation is identified by gunicorn's config object, which a reload (HUP) replaces:
    the workers of one generation, respawns included, fork from one freeze. Never raises.
    """
    cfg = getattr(server, "cfg", None)
    _gc_freeze.freeze(server if cfg is None else cfg, "gunicorn pre_fork")


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn ``post_fork`` hook: reset forksafe-tracked connections in the new worker.

    Freezes the collector here when the master did not (no ``pre_fork`` hook). Never
    raises: a raising ``post_fork`` makes gunicorn halt the whole server.
    """
    if _gc_freeze.freezes() == 0 and gc.get_freeze_count() == 0:
        _gc_freeze.freeze(None, "gunicorn post_fork")
    try:
        _fork.after_fork()
    except Exception as exc:  # pragma: no cover - after_fork never raises
        _fork.report_internal_error(exc, "gunicorn post_fork")


def _arity(hook: Callable[..., object]) -> int:
    """The parameter count gunicorn checks: every positional parameter, defaults included."""
    try:
        from gunicorn.util import get_arity
    except ImportError:  # pragma: no cover - gunicorn is what loads these hooks
        return sum(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            for p in inspect.signature(hook).parameters.values()
        )
    return int(get_arity(hook))


def _check(hook: object, setting: str) -> Hook:
    if not callable(hook):
        raise TypeError(
            f"forksafe.gunicorn needs a function for {setting}, got {type(hook).__name__}"
        )
    try:
        arity = _arity(hook)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{setting}: cannot read the signature of {hook!r} ({exc}); define it as "
            f"def {setting}(server, worker)"
        ) from exc
    if arity != 2:
        try:
            signature = str(inspect.signature(hook))
        except (TypeError, ValueError):  # pragma: no cover - _arity read it above
            signature = "(...)"
        raise TypeError(
            f"{getattr(hook, '__qualname__', hook)!r}{signature} has {arity} positional "
            f"parameter(s); gunicorn calls {setting} with exactly (server, worker) and "
            "rejects any other count at start-up (parameters with defaults count too, "
            f"*args does not): define it as def {setting}(server, worker)"
        )
    return hook


def _wrap(hook: Hook, first: Callable[[Any, Any], None], setting: str) -> Hook:
    def chained(server: Any, worker: Any) -> None:
        first(server, worker)
        hook(server, worker)

    chained.__wrapped__ = hook  # type: ignore[attr-defined]
    chained.__name__ = getattr(hook, "__name__", setting)
    chained.__qualname__ = getattr(hook, "__qualname__", setting)
    chained.__doc__ = hook.__doc__
    return chained


def chain(hook: Hook) -> Hook:
    """Return a ``post_fork(server, worker)`` that runs forksafe's `post_fork`, then ``hook``.

    Args:
        hook: your own ``post_fork(server, worker)``.

    Raises:
        TypeError: if gunicorn would reject ``hook``: not callable, or not exactly two
            positional parameters (gunicorn counts the ones with defaults too).
    """
    return _wrap(_check(hook, "post_fork"), post_fork, "post_fork")


def chain_pre_fork(hook: Hook) -> Hook:
    """Return a ``pre_fork(server, worker)`` that runs forksafe's `pre_fork`, then ``hook``.

    Raises:
        TypeError: as `chain` does.
    """
    return _wrap(_check(hook, "pre_fork"), pre_fork, "pre_fork")
