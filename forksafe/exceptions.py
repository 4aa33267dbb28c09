"""Errors and warnings raised by forksafe.

Kept in their own module so every other module can import them without cycles.
"""

from __future__ import annotations

__all__ = [
    "ChildDeadlockedError",
    "CommitUnknownError",
    "ForkSafetyWarning",
    "ForksafeError",
    "UnsupportedObjectError",
]


class ForksafeError(Exception):
    """Base class of every error forksafe raises.

    .. versionadded:: 0.1
    """


class UnsupportedObjectError(ForksafeError, TypeError):
    """`forksafe.track` was given an object it does not know how to protect.

    It is a `TypeError` too, so ``except TypeError`` works as users expect.

    .. versionadded:: 0.1
    """


class ChildDeadlockedError(ForksafeError):
    """A lock held by a thread of the parent at fork time could not be taken in the child.

    Only after a fork no Python hook saw (uWSGI without ``import = forksafe.uwsgi``,
    ``fork(2)`` through ctypes): the child waited, then replaced the lock. It is logged and
    listed in `forksafe.internal_errors`, never raised.

    .. versionadded:: 0.1
    """


class CommitUnknownError(ForksafeError):
    """The connection was lost during COMMIT: the transaction may or may not be committed.

    Raised by `forksafe.retry_on_disconnect` / `forksafe.retrying` instead of re-running
    the work, because re-running a write whose COMMIT reached the server applies it twice.
    The original error is the ``__cause__``. Check whether the work took effect (for example
    by a unique key the work wrote) before doing it again.

    .. versionadded:: 0.2
    """


class ForkSafetyWarning(UserWarning):
    """Something about a fork may share a database connection between processes.

    .. versionadded:: 0.1
    """


class UntrackedConnectionError(ForksafeError):
    """Strict mode: a child used (or opened a connection while holding) an inherited database
    connection that nobody tracked. The message names each one and where it was created.

    .. versionadded:: 0.2
    """
