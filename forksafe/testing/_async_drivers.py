"""Which asyncio driver the ``gunicorn-uvicorn`` scenario uses for a database URL.

Kept apart from `forksafe.testing.asgi_app`, which connects to the database as it is
imported: ``forksafe repro`` checks the driver here before it starts any server.
"""

from __future__ import annotations

import importlib.util

__all__ = ["ASYNC_DRIVERS", "async_driver", "async_url", "missing_async_driver"]

#: backend -> (SQLAlchemy asyncio driver, module it needs, pip hint)
ASYNC_DRIVERS: dict[str, tuple[str, str, str]] = {
    "postgresql": ("psycopg_async", "psycopg", "pip install 'forksafe[asgi]'"),
    "mysql": ("aiomysql", "aiomysql", "pip install aiomysql"),
}


def _backend(url_string: str) -> str:
    from sqlalchemy.engine import make_url

    backend = make_url(url_string).get_backend_name()
    return "mysql" if backend == "mariadb" else backend


def async_driver(url_string: str) -> str:
    """The asyncio driver used for the backend of ``url_string`` (e.g. ``psycopg_async``)."""
    backend = _backend(url_string)
    if backend not in ASYNC_DRIVERS:
        raise ValueError(f"no asyncio driver for {backend!r}: use PostgreSQL or MySQL/MariaDB")
    return ASYNC_DRIVERS[backend][0]


def async_url(url_string: str) -> str:
    """``url_string`` with its driver replaced by the backend's asyncio driver."""
    from sqlalchemy.engine import make_url

    url = make_url(url_string)
    backend = _backend(url_string)
    return url.set(drivername=f"{backend}+{async_driver(url_string)}").render_as_string(
        hide_password=False
    )


def missing_async_driver(url_string: str) -> str | None:
    """None when the asyncio driver for ``url_string`` is importable, else what to do."""
    backend = _backend(url_string)
    driver, module, hint = ASYNC_DRIVERS.get(backend, ("", "", ""))
    if not module:
        return f"no asyncio driver for {backend!r}"
    if importlib.util.find_spec(module) is None:
        return f"the {driver} driver needs the {module} module: {hint}"
    return None
