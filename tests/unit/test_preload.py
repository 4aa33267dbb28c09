"""forksafe.preload.warm_up: requests through a WSGI app in this process, never raising."""

from __future__ import annotations

import logging

import pytest
from flask import Flask, jsonify
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select

from forksafe.preload import warm_up


def make_app() -> tuple[Flask, object]:
    engine = create_engine("sqlite://")
    metadata = MetaData()
    items = Table("items", metadata, Column("id", Integer, primary_key=True),
                  Column("name", String(20)))  # fmt: skip
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(items), [{"id": 1, "name": "one"}])
    app = Flask(__name__)

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> object:
        with engine.connect() as conn:
            row = conn.execute(select(items).where(items.c.id == item_id)).one()
        return jsonify(id=row.id, name=row.name, page=1)

    @app.get("/boom")
    def boom() -> object:
        raise RuntimeError("the handler fails on purpose")

    return app, engine


def test_warm_up_runs_the_requests_and_fills_the_compiled_cache() -> None:
    """Each path goes through the app; SQLAlchemy's compiled-statement cache is filled."""
    app, engine = make_app()
    cache = engine._compiled_cache  # type: ignore[attr-defined]
    before = len(cache)
    assert warm_up(app, ["/items/1", "/items/1?x=1", "/missing"]) == [
        "200 OK", "200 OK", "404 NOT FOUND",
    ]  # fmt: skip
    assert len(cache) > before


def test_warm_up_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """A failing request is a warning and an ``error: ...`` entry; the next still runs."""

    def broken(environ: dict, start_response: object) -> list[bytes]:
        raise RuntimeError("the app fails on purpose")

    with caplog.at_level(logging.WARNING, logger="forksafe"):
        assert warm_up(broken, ["/a"]) == ["error: RuntimeError('the app fails on purpose')"]
    assert "GET /a failed" in caplog.text
    app, _ = make_app()
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert warm_up(app, ["/boom", "/items/1"]) == ["500 INTERNAL SERVER ERROR", "200 OK"]
