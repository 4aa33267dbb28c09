"""The ASGI app of the ``gunicorn-uvicorn`` scenario: an ``AsyncEngine`` used at import.

The asyncio twin of `forksafe.testing.app`, served by gunicorn with ``uvicorn-worker``'s
``UvicornWorker`` and ``preload_app``: the master imports this module, which creates an
``AsyncEngine`` and uses it once (``asyncio.run`` at import, as apps do to check the
database, create tables or warm a cache), so a connection sits idle in the engine's pool
when gunicorn forks. Every worker then runs its own event loop (uvicorn's) on that pool.

Without forksafe every worker inherits that connection: they share one socket (answers
cross between workers, the protocol desyncs), and the connection belongs to an event loop
that is gone in the worker. With forksafe (``forksafe.track(engine)`` here and
``from forksafe.gunicorn import post_fork`` in gunicorn.conf.py) the worker's engine starts
with a fresh pool, so each worker opens its own connections, in its own loop.

Configured by the same environment as `forksafe.testing.app` (``FORKSAFE_REPRO_URL``,
``FORKSAFE_REPRO_PROTECT``, ``FORKSAFE_REPRO_DB_TIMEOUT``). The URL's driver is replaced by
an asyncio driver (`forksafe.testing._async_drivers`, ``FORKSAFE_REPRO_ASYNC_DRIVER``):
by default psycopg 3's (``postgresql+psycopg_async``) or aiomysql; asyncpg and asyncmy on
request.

Requests: ``GET /?n=<unique number>`` answers ``{"echo": n, "rows": [...], "pid": ...}``;
a failure answers 500 with ``{"error": <category>, "message": ...}``; ``GET /health``
touches no database. Built on Starlette (what FastAPI is made of).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from forksafe.testing import checks
from forksafe.testing._async_drivers import ENV_ASYNC_DRIVER, async_url

__all__ = ["Database", "answer", "app"]

# checks.TABLE is a constant, never input
_ROWS_SQL = f"SELECT id, label FROM {checks.TABLE} WHERE id BETWEEN :a AND :b ORDER BY id"  # noqa: S608


class Database:
    """The app's ``AsyncEngine``, protected by forksafe or not."""

    def __init__(self, url: str, protect: bool, timeout: int, driver: str = "") -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        target = async_url(url, driver)
        # a query stuck on a shared socket is bounded by `answer`'s wait_for (none of the
        # asyncio drivers has a read timeout); asyncpg calls its connect timeout "timeout"
        key = "timeout" if "+asyncpg" in target else "connect_timeout"
        engine = create_async_engine(target, pool_size=8, connect_args={key: timeout})
        if protect:
            import forksafe

            engine = forksafe.track(engine)
        self.engine = engine
        self.timeout = timeout

    async def answer(self, n: int) -> dict[str, Any]:
        """Run request ``n``'s two queries on one connection and return what came back."""
        from sqlalchemy import Integer, bindparam, text

        a = checks.first_id_for(n)
        # typed parameters: asyncpg does not guess a type from a bare $1
        echo_sql = text("SELECT :n AS echo").bindparams(bindparam("n", type_=Integer))
        rows_sql = text(_ROWS_SQL).bindparams(
            bindparam("a", type_=Integer), bindparam("b", type_=Integer)
        )
        async with self.engine.connect() as conn:
            first = (await conn.execute(echo_sql, {"n": n})).mappings().all()
            echo = first[0]["echo"] if first else None
            result = await conn.execute(
                rows_sql, {"a": a, "b": a + checks.ROWS_PER_REQUEST - 1}
            )
            rows = [[r["id"], r["label"]] for r in result.mappings().all()]
        return {"echo": echo, "rows": rows}


def open_database() -> Database:
    """Build the `Database` from the environment and use it once, in a loop of its own."""
    url = os.environ.get(checks.ENV_URL)
    if not url:
        raise RuntimeError(f"{checks.ENV_URL} is not set: run this app through forksafe repro")
    mode = os.environ.get(checks.ENV_MODE, "engine")
    if mode != "engine":
        raise RuntimeError(f"the ASGI scenario has only the engine mode, not {mode!r}")
    database = Database(
        url,
        protect=os.environ.get(checks.ENV_PROTECT, "1") == "1",
        timeout=int(os.environ.get(checks.ENV_DB_TIMEOUT, "3")),
        driver=os.environ.get(ENV_ASYNC_DRIVER, ""),
    )
    # What an app does at import: check the database (create tables, warm a cache) in an
    # event loop of its own. The connection stays idle in the pool when the master forks.
    asyncio.run(database.answer(0))
    return database


DB = open_database()


async def answer(n: int) -> dict[str, Any]:
    """Request ``n``'s answer, or ``{"error": category, "message": ...}`` on failure."""
    try:
        body = await asyncio.wait_for(DB.answer(n), timeout=DB.timeout + 2)
    except Exception as exc:
        return {"error": checks.classify_exception(exc), "message": str(exc)[:300]}
    body["pid"] = os.getpid()
    return body


def _build_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def index(request: Request) -> Response:
        try:
            n = int(request.query_params["n"])
        except (KeyError, ValueError):
            return PlainTextResponse("GET /?n=<integer>\n", status_code=400)
        body = await answer(n)
        return JSONResponse(body, status_code=500 if "error" in body else 200)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", index), Route("/health", health)])


app = _build_app()
