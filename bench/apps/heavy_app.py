"""A heavier WSGI app for the memory benchmark: many imports and module-level data.

What a real service loads at start-up: a web framework and an ORM with mapped models,
template, e-mail, XML, HTTP client and serialisation libraries, and data it keeps in memory
(a lookup table built at import). It creates a SQLAlchemy engine, tracks it with forksafe
unless ``BENCH_FORKSAFE=0``, and uses it once at import (``DATABASE_URL``).

``GET /_pid?hold=SECONDS`` answers the worker's pid (see bench/apps/flask_bench.py), and
every response carries ``X-Pid``; ``GET /`` answers one cached record and a ``SELECT 1`` as
JSON; ``GET /items/<id>`` loads one of 2,000 rows through the ORM (a ``Session``, the first
mapped model and its relationship's parent) and answers it as JSON. The tables are created
and the rows seeded at import when missing. ``BENCH_WARMUP=1`` sends a few requests through
the app at import (in the master, when preloaded); bench/apps/_gc_variant.py holds a
collector variant.
"""

from __future__ import annotations

import _gc_variant  # first, before anything else is imported

# isort: split

import asyncio  # noqa: F401
import csv  # noqa: F401
import decimal
import email.mime.multipart
import email.mime.text  # noqa: F401
import http.client  # noqa: F401
import json
import logging.config  # noqa: F401
import os
import sqlite3  # noqa: F401
import urllib.request  # noqa: F401
import uuid  # noqa: F401
import xml.dom.minidom
import xml.etree.ElementTree  # noqa: F401
import zoneinfo  # noqa: F401
from collections.abc import Callable, Iterable
from typing import Any

import django.db
import django.forms
import django.template  # noqa: F401
import flask  # noqa: F401
import jinja2  # noqa: F401
import pyramid.config
import pyramid.view  # noqa: F401
import sqlalchemy.ext.asyncio
import sqlalchemy.orm
from _pid import with_pid
from sqlalchemy import ForeignKey, Integer, Numeric, String, create_engine, func, select, text

import forksafe

__all__ = ["application"]

DATABASE_URL = os.environ.get("DATABASE_URL", "mysql+mysqldb://root@127.0.0.1:3307/forksafe")


class Base(sqlalchemy.orm.DeclarativeBase):
    pass


def _model(i: int) -> type:
    """One mapped model with a handful of columns and a relationship to the previous one."""
    attrs: dict[str, Any] = {
        "__tablename__": f"heavy_model_{i}",
        "id": sqlalchemy.orm.mapped_column(Integer, primary_key=True),
        "name": sqlalchemy.orm.mapped_column(String(100)),
        "code": sqlalchemy.orm.mapped_column(String(20), index=True),
        "price": sqlalchemy.orm.mapped_column(Numeric(10, 2)),
        "note": sqlalchemy.orm.mapped_column(String(255), nullable=True),
    }
    if i:
        attrs["parent_id"] = sqlalchemy.orm.mapped_column(ForeignKey(f"heavy_model_{i - 1}.id"))
    return type(f"HeavyModel{i}", (Base,), attrs)


MODELS = [_model(i) for i in range(40)]
sqlalchemy.orm.configure_mappers()

# A lookup table kept in memory (about 40 MB of Python objects), as services cache
# reference data at start-up.
CATALOGUE = {
    i: {
        "id": i,
        "name": f"item {i:06d}",
        "price": decimal.Decimal(i % 10000) / 100,
        "tags": [f"tag{i % 17}", f"tag{i % 29}"],
    }
    for i in range(100_000)
}

_engine = create_engine(DATABASE_URL, pool_size=5)
engine = forksafe.track(_engine) if os.environ.get("BENCH_FORKSAFE", "1") == "1" else _engine
ITEMS = 2000


def _setup() -> None:
    """Create the tables and seed the rows /items reads, once (used at import, as apps do)."""
    Base.metadata.create_all(engine)
    first, second = MODELS[0], MODELS[1]
    with sqlalchemy.orm.Session(engine) as session, session.begin():
        if session.scalar(select(func.count()).select_from(second)) == ITEMS:
            return
        session.execute(second.__table__.delete())
        session.execute(first.__table__.delete())
        session.add_all(
            first(id=i, name=f"parent {i}", code=f"P{i}", price=decimal.Decimal(i) / 100)
            for i in range(1, ITEMS + 1)
        )
        session.flush()
        session.add_all(
            second(
                id=i, name=f"item {i}", code=f"I{i}", price=decimal.Decimal(i) / 100, parent_id=i
            )
            for i in range(1, ITEMS + 1)
        )


_setup()


def _item(item_id: int) -> bytes | None:
    """One row and its parent row through the ORM, as JSON."""
    first, second = MODELS[0], MODELS[1]
    with sqlalchemy.orm.Session(engine) as session:
        row = session.get(second, item_id)
        if row is None:
            return None
        parent = session.get(first, row.parent_id)
        return json.dumps(
            {
                "id": row.id,
                "name": row.name,
                "code": row.code,
                "price": str(row.price),
                "parent": None if parent is None else {"id": parent.id, "name": parent.name},
            }
        ).encode()


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/items/<id>`` (the ORM) or ``/`` (a cached record and a query)."""
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/items/"):
        body = _item(int(path.rsplit("/", 1)[1])) if path.rsplit("/", 1)[1].isdigit() else None
        if body is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no such item\n"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    with engine.connect() as conn:
        one = conn.execute(text("SELECT 1")).scalar()
    item = CATALOGUE[os.getpid() % len(CATALOGUE)]
    body = json.dumps({"one": one, "item": {**item, "price": str(item["price"])}}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


application = with_pid(_app)

if os.environ.get("BENCH_WARMUP") == "1":
    from forksafe.preload import warm_up

    warm_up(application, ["/items/1", "/items/2", "/"])

_gc_variant.at_end()
