"""Which asyncio driver the ``gunicorn-uvicorn`` scenario uses for a database URL.

Kept apart from `forksafe.testing.asgi_app`, which connects to the database as it is
imported: ``forksafe repro`` checks the driver here before it starts any server.
``--async-driver`` picks one (``FORKSAFE_REPRO_ASYNC_DRIVER`` in the app's environment);
by default PostgreSQL goes through psycopg 3's asyncio driver, MySQL/MariaDB through
aiomysql.
"""

from __future__ import annotations

import importlib.util

__all__ = [
    "ASYNC_DRIVERS",
    "DEFAULT_ASYNC_DRIVER",
    "ENV_ASYNC_DRIVER",
    "async_driver",
    "async_url",
    "missing_async_driver",
]

#: the app's environment: the asyncio driver to use (empty: the backend's default)
ENV_ASYNC_DRIVER = "FORKSAFE_REPRO_ASYNC_DRIVER"

#: SQLAlchemy asyncio driver -> (backend, module it needs, pip hint)
ASYNC_DRIVERS: dict[str, tuple[str, str, str]] = {
    "psycopg_async": ("postgresql", "psycopg", "pip install 'forksafe[asgi]'"),
    "asyncpg": ("postgresql", "asyncpg", "pip install asyncpg"),
    "aiomysql": ("mysql", "aiomysql", "pip install aiomysql"),
    "asyncmy": ("mysql", "asyncmy", "pip install asyncmy"),
}
DEFAULT_ASYNC_DRIVER = {"postgresql": "psycopg_async", "mysql": "aiomysql"}


def _backend(url_string: str) -> str:
    from sqlalchemy.engine import make_url

    backend = make_url(url_string).get_backend_name()
    return "mysql" if backend == "mariadb" else backend


def async_driver(url_string: str, chosen: str = "") -> str:
    """The asyncio driver for ``url_string``'s backend: ``chosen``, or the default.

    Raises:
        ValueError: no asyncio driver for that backend, or ``chosen`` speaks another one.
    """
    backend = _backend(url_string)
    if backend not in DEFAULT_ASYNC_DRIVER:
        raise ValueError(f"no asyncio driver for {backend!r}: use PostgreSQL or MySQL/MariaDB")
    if not chosen:
        return DEFAULT_ASYNC_DRIVER[backend]
    if chosen not in ASYNC_DRIVERS:
        raise ValueError(f"unknown asyncio driver {chosen!r}: one of {', '.join(ASYNC_DRIVERS)}")
    if ASYNC_DRIVERS[chosen][0] != backend:
        raise ValueError(f"the asyncio driver {chosen} does not speak to a {backend} server")
    return chosen


def async_url(url_string: str, chosen: str = "") -> str:
    """``url_string`` with its driver replaced by the asyncio driver."""
    from sqlalchemy.engine import make_url

    url = make_url(url_string)
    driver = async_driver(url_string, chosen)
    return url.set(drivername=f"{_backend(url_string)}+{driver}").render_as_string(
        hide_password=False
    )


def missing_async_driver(url_string: str, chosen: str = "") -> str | None:
    """None when the asyncio driver for ``url_string`` can be used, else what to do."""
    try:
        driver = async_driver(url_string, chosen)
    except ValueError as exc:
        return str(exc)
    _backend_name, module, hint = ASYNC_DRIVERS[driver]
    if importlib.util.find_spec(module) is None:
        return f"the {driver} driver needs the {module} module: {hint}"
    return None
