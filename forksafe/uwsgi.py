"""uWSGI integration: ``import = forksafe.uwsgi`` in uwsgi.ini (or ``import forksafe.uwsgi``).

uWSGI forks its workers in C. Python's ``os.register_at_fork`` hooks do not run there unless
``py-call-osafterfork`` or ``py-call-uwsgi-fork-hooks`` is set; what always runs, in every
worker after every fork (respawns and reloads included), is the callable stored in
``uwsgi.post_fork_hook``. That attribute holds a single callable, so forksafe chains:

* **with the master** (``uwsgi.masterpid() != 0``) it imports ``uwsgidecorators`` itself and
  puts its reset first in ``uwsgidecorators.postfork_chain``. Importing ``uwsgidecorators``
  replaces ``uwsgi.post_fork_hook``, so a hook the user set before is saved and appended to
  the chain; a later ``import uwsgidecorators`` by the app is a no-op (already imported), so
  ``@postfork`` functions keep working and cannot drop ours;
* **without the master** ``uwsgidecorators`` refuses to import, so forksafe wraps whatever
  ``uwsgi.post_fork_hook`` holds. (Worker 1 is then the original process: the hook runs
  there too and finds nothing to do.)

Importing ``uwsgidecorators`` also sets ``uwsgi.spooler`` and ``uwsgi.mule_msg_hook`` (its
dispatchers for ``@spool`` and ``@mulefunc``). A spooler or mule message handler the app set
*before* importing forksafe.uwsgi is put back after that import; one set after it is not
touched. So the handlers are what they would be without forksafe.

A hook assigned to ``uwsgi.post_fork_hook`` by hand *after* this import replaces ours; the
pid check at every checkout of a tracked engine still catches that fork, but call
``forksafe.after_fork()`` from such a hook. With ``lazy-apps`` every worker loads the app
after the fork, so nothing is inherited and nothing needs resetting.

**Garbage collector freeze.** The hook first runs ``gc.freeze()`` in the new worker, before
any other Python code runs there, so that the worker's collections never write to the
pages of the app loaded in the master: with preloading (no ``lazy-apps``) they stay
shared after traffic. uWSGI forks in C and runs no Python in the master between loading
the app and forking, so the worker's first moment is the earliest one after the app is
loaded; nothing can have been collected in between. ``FORKSAFE_GC_FREEZE=0`` turns it off
(see `forksafe._gc_freeze` for the cost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forksafe import _fork, _gc_freeze

try:
    import uwsgi
except ImportError as _err:
    raise ImportError(
        "forksafe.uwsgi only works inside a uWSGI worker (the 'uwsgi' module is provided by "
        "the uWSGI server). Under gunicorn use forksafe.gunicorn; elsewhere a plain "
        "'import forksafe' already protects os.fork and multiprocessing."
    ) from _err

__all__ = ["install", "post_fork"]


def post_fork() -> None:
    """Freeze the collector, then reset forksafe-tracked connections. Never raises."""
    if _gc_freeze.freezes() == 0:  # once per process: a worker inherits the count
        _gc_freeze.freeze(None, "uWSGI post_fork_hook")
    try:
        _fork.after_fork()
    except Exception as exc:  # pragma: no cover - after_fork never raises
        _fork.report_internal_error(exc, "uWSGI post_fork_hook")


def _chain(previous: Callable[[], Any] | None) -> Callable[[], None]:
    def forksafe_post_fork_hook() -> None:
        post_fork()
        if previous is not None:
            previous()

    forksafe_post_fork_hook.forksafe = True  # type: ignore[attr-defined]
    return forksafe_post_fork_hook


def _ours(hook: object) -> bool:
    return hook is post_fork or bool(getattr(hook, "forksafe", False))


#: uwsgi attributes that importing uwsgidecorators overwrites, besides post_fork_hook
_HANDLERS = ("spooler", "mule_msg_hook")


def install() -> str:
    """Register forksafe's reset with uWSGI (idempotent). Returns how it was registered."""
    previous = getattr(uwsgi, "post_fork_hook", None)
    if uwsgi.masterpid() != 0:
        # Importing uwsgidecorators sets these two; the app's own (set before) are restored.
        handlers = {name: getattr(uwsgi, name, None) for name in _HANDLERS}
        try:
            import uwsgidecorators
        except Exception:  # an unusual build without it: fall back to wrapping
            uwsgidecorators = None
        for name, handler in handlers.items():
            if handler is not None and getattr(uwsgi, name, None) is not handler:
                setattr(uwsgi, name, handler)
        if uwsgidecorators is not None:
            chain: list[Callable[[], Any]] = uwsgidecorators.postfork_chain
            chain_hook = uwsgidecorators.postfork_chain_hook
            # The import replaced a hook set before it; or the app set one by hand after
            # importing uwsgidecorators. Either way it moves into the chain, not lost.
            for hook in (previous, getattr(uwsgi, "post_fork_hook", None)):
                if hook is None or hook is chain_hook or _ours(hook) or hook in chain:
                    continue
                chain.append(hook)
            if post_fork not in chain:
                chain.insert(0, post_fork)  # reset before any hook that may use the database
            uwsgi.post_fork_hook = chain_hook
            return "uwsgidecorators.postfork_chain"
    if not _ours(previous):
        uwsgi.post_fork_hook = _chain(previous)
    return "uwsgi.post_fork_hook"


INSTALLED_VIA = install()
