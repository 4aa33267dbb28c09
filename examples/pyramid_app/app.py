"""A Pyramid + SQLAlchemy + MySQLdb app under uWSGI (master, several processes), protected.

This is the setup of a classic bug report: the engine is created when the app loads and
used right away (here: to create and fill a table of users), uWSGI forks its workers after
that, and, without protection, every worker shares one MySQL session: "MySQL server has
gone away", ``NoSuchColumnError``, ``ResourceClosedError`` under concurrent requests.
``import = forksafe.uwsgi`` in uwsgi.ini plus ``forksafe.track(engine)`` here fix it.

* ``GET /users/{id}``: one user as JSON;
* ``GET /users?offset=N``: 20 users as JSON;
* ``GET /health``: 200 ``ok`` when a query of the database succeeds, else 503.

``DATABASE_URL`` picks the database (default: the private MariaDB of
``python -m forksafe.testing.dbserver``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPNotFound
from pyramid.request import Request
from pyramid.response import Response
from pyramid.view import view_config
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy.engine import Connection

import forksafe

DATABASE_URL = os.environ.get("DATABASE_URL", "mysql+mysqldb://root@127.0.0.1:3307/forksafe")
USERS = 2000

metadata = MetaData()
users = Table(
    "example_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("login", String(50), nullable=False),
    Column("email", String(100), nullable=False),
)

engine = forksafe.track(create_engine(DATABASE_URL))


def login_of(user_id: int) -> str:
    """The seeded login of a user."""
    return f"user{user_id:05d}"


@contextlib.contextmanager
def _setup_lock(conn: Connection) -> Iterator[None]:
    """One process at a time: with uWSGI lazy-apps every worker imports the app at once, and
    two that create the table or seed together fail ('1050 Table already exists', '1213
    Deadlock'). MySQL's GET_LOCK orders them (released on disconnect too)."""
    mysql = conn.dialect.name in ("mysql", "mariadb")
    if mysql and conn.execute(text("SELECT GET_LOCK('forksafe_example_setup', 120)")).scalar() != 1:
        raise RuntimeError("another process held the setup lock for 120 s")
    conn.commit()
    try:
        yield
    finally:
        if mysql:
            conn.rollback()
            conn.execute(text("SELECT RELEASE_LOCK('forksafe_example_setup')"))
            conn.commit()


def _setup() -> None:
    """Create the table and seed it once, whichever process comes first."""
    with engine.connect() as conn, _setup_lock(conn):
        metadata.create_all(conn)  # checks first: a table another worker made is kept
        conn.commit()
        if conn.execute(select(func.count()).select_from(users)).scalar() != USERS:
            conn.execute(users.delete())
            conn.execute(
                users.insert(),
                [
                    {"id": i, "login": login_of(i), "email": f"{login_of(i)}@example.org"}
                    for i in range(1, USERS + 1)
                ],
            )
        conn.commit()


_setup()


def _as_dict(row: Any) -> dict[str, Any]:
    return {"id": row.id, "login": row.login, "email": row.email}


@view_config(route_name="user", renderer="json")
def user(request: Request) -> dict[str, Any]:
    user_id = int(request.matchdict["id"])
    with engine.connect() as conn:
        row = conn.execute(select(users).where(users.c.id == user_id)).first()
    if row is None:
        raise HTTPNotFound()
    return _as_dict(row)


@view_config(route_name="users", renderer="json")
def user_list(request: Request) -> dict[str, Any]:
    offset = int(request.params.get("offset", 0))
    query = select(users).order_by(users.c.id).limit(20).offset(offset)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return {"offset": offset, "users": [_as_dict(r) for r in rows]}


@view_config(route_name="health")
def health(request: Request) -> Response:
    """200 when the database answers a query of the app's table, else 503 with the cause."""
    try:
        with engine.connect() as conn:
            conn.execute(select(users.c.id).limit(1)).all()
    except Exception as exc:  # any failure is "unhealthy"; the type names it, no password
        return Response(f"database unavailable: {type(exc).__name__}\n", status=503)
    return Response("ok", content_type="text/plain")


def make_app() -> Any:
    """The WSGI application."""
    with Configurator() as config:
        config.add_route("health", "/health")
        config.add_route("users", "/users")
        config.add_route("user", "/users/{id}")
        config.scan(__name__)
        return config.make_wsgi_app()


application = make_app()
