"""Strict mode (``configure(strict=True)`` or ``FORKSAFE_STRICT=1``): in a child that
inherited connections nobody tracked, their first use raises `UntrackedConnectionError`
(the inherited object itself: ``cursor()``, ``query()``, ``execute()``, not possible for
psycopg2's C class; a checkout from such an engine) and so does any new connection while
instrumented. Fork-time code itself never raises: it only arms these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from forksafe._records import CONFIG
from forksafe.drivers import find_driver
from forksafe.exceptions import UntrackedConnectionError

__all__ = ["PENDING", "check_pending", "poison", "strict_message"]

#: Descriptions of the untracked inherited objects this process found (reset in each child).
PENDING: list[str] = []


def check_pending() -> None:
    if PENDING and CONFIG.strict:
        raise UntrackedConnectionError(strict_message(PENDING))


def strict_message(items: list[str]) -> str:
    return (
        f"forksafe strict mode: this process (pid {os.getpid()}) inherited "
        f"{len(items)} database connection(s) nobody tracked: {'; '.join(items)}. "
        "Track them (forksafe.track) or call forksafe.instrument() before they are created."
    )


def _make_raiser(description: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise UntrackedConnectionError(strict_message([description]))

    return refuse



def poison(obj: Any, description: str) -> None:
    refuse = _make_raiser(description)
    if find_driver(obj) is None:  # an engine: refuse its next checkout
        from sqlalchemy import event

        def on_checkout(*args: Any) -> None:
            refuse()

        event.listen(obj, "checkout", on_checkout)
        return
    for name in ("cursor", "query", "execute"):
        if hasattr(obj, name):
            try:
                setattr(obj, name, refuse)
            except (AttributeError, TypeError):  # psycopg2: a C class without __dict__
                break
