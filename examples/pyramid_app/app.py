"""A Pyramid + SQLAlchemy + MySQLdb app under uWSGI (master, several processes), protected.

This is the setup of a classic bug report: the engine is created when the app loads and
used right away (here: to create and fill a table of users), uWSGI forks its workers after
that, and, without protection, every worker shares one MySQL session: "MySQL server has
gone away", ``NoSuchColumnError``, ``ResourceClosedError`` under concurrent requests.
``import = forksafe.uwsgi`` in uwsgi.ini plus ``forksafe.track(engine)`` here fix it.

* ``GET /users/{id}``: one user as JSON;
* ``GET /users?offset=N``: 20 users as JSON;
* ``GET /health``.

``DATABASE_URL`` picks the database (default: the private MariaDB of
``python -m forksafe.testing.dbserver``).
"""

from __future__ import annotations

import os
from typing import Any

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPNotFound
from pyramid.request import Request
from pyramid.view import view_config
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select

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


def _setup() -> None:
    metadata.create_all(engine)
    with engine.begin() as conn:
        if conn.execute(select(func.count()).select_from(users)).scalar() == USERS:
            return
        conn.execute(users.delete())
        conn.execute(
            users.insert(),
            [
                {"id": i, "login": login_of(i), "email": f"{login_of(i)}@example.org"}
                for i in range(1, USERS + 1)
            ],
        )


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


@view_config(route_name="health", renderer="string")
def health(request: Request) -> str:
    return "ok"


def make_app() -> Any:
    """The WSGI application."""
    with Configurator() as config:
        config.add_route("health", "/health")
        config.add_route("users", "/users")
        config.add_route("user", "/users/{id}")
        config.scan(__name__)
        return config.make_wsgi_app()


application = make_app()
