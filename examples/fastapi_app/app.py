"""A FastAPI + SQLAlchemy asyncio shop API, protected by forksafe.

The ``AsyncEngine`` is created, tracked and used at import: ``asyncio.run(setup())`` creates
the tables and seeds 5,000 products when the database is empty, so a connection sits in the
engine's pool when gunicorn (``preload_app``) forks its uvicorn workers. That connection
belongs to the master and to an event loop that is gone: forksafe gives every worker a
fresh pool, whose connections it opens in its own loop.

* ``GET /products?page=N``: 50 products a page, as JSON;
* ``GET /products/{id}``: one product;
* ``POST /orders`` (JSON ``{"product_id", "quantity", "token"}``): records an order and
  answers it back. The token makes it idempotent: sending the same order again (a client's
  retry) answers the stored order; the same token for another order is a 409. The write is
  an ``async def`` under ``@forksafe.retry_on_disconnect``: a disconnect before COMMIT
  (a database restart, a killed session) is retried; one during COMMIT is not repeated;
* ``GET /health``.

``DATABASE_URL`` picks the database (default: the private PostgreSQL of
``python -m forksafe.testing.dbserver --postgres``,
``postgresql+psycopg_async://postgres@127.0.0.1:5433/forksafe``).
"""

from __future__ import annotations

import asyncio
import os

from catalogue import PER_PAGE, PRODUCTS, product_name, product_price
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

import forksafe

DATABASE_URL = os.environ.get(
    "DATABASE_URL", "postgresql+psycopg_async://postgres@127.0.0.1:5433/forksafe"
)

metadata = MetaData()
products = Table(
    "example_products",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("price", Numeric(10, 2), nullable=False),
)
orders = Table(
    "example_orders",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("product_id", Integer, ForeignKey("example_products.id"), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("token", String(64), nullable=False, unique=True),
    Column("created", DateTime, server_default=func.now()),
)

# The one line forksafe asks for: every forked worker gets a fresh pool for this engine
# (with `from forksafe.gunicorn import post_fork` in gunicorn.conf.py).
engine = forksafe.track(create_async_engine(DATABASE_URL, pool_size=5))


async def setup() -> None:
    """Create the tables and seed the catalogue once (this uses the engine at import)."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        count = (await conn.execute(select(func.count()).select_from(products))).scalar()
        if count == PRODUCTS:
            return
        await conn.execute(orders.delete())
        await conn.execute(products.delete())
        await conn.execute(
            insert(products),
            [
                {"id": i, "name": product_name(i), "price": product_price(i)}
                for i in range(1, PRODUCTS + 1)
            ],
        )


asyncio.run(setup())  # at import, in the gunicorn master, before the workers fork

app = FastAPI(title="forksafe FastAPI example")


class Order(BaseModel):
    product_id: int = Field(gt=0)
    quantity: int = Field(gt=0)
    token: str = Field(min_length=1, max_length=64)


@app.get("/health")
async def health() -> str:
    return "ok"


@app.get("/products")
async def listing(page: int = 1) -> dict[str, object]:
    pages = (PRODUCTS + PER_PAGE - 1) // PER_PAGE
    if not 1 <= page <= pages:
        raise HTTPException(404, f"page {page} does not exist (1 to {pages})")
    query = (
        select(products.c.id, products.c.name, products.c.price)
        .order_by(products.c.id)
        .limit(PER_PAGE)
        .offset((page - 1) * PER_PAGE)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {
        "page": page,
        "pages": pages,
        "products": [{"id": r.id, "name": r.name, "price": f"{r.price:.2f}"} for r in rows],
    }


@app.get("/products/{product_id}")
async def product(product_id: int) -> dict[str, object]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(products).where(products.c.id == product_id))).first()
    if row is None:
        raise HTTPException(404, f"no product {product_id}")
    return {"id": row.id, "name": row.name, "price": f"{row.price:.2f}"}


@forksafe.retry_on_disconnect(attempts=3, backoff=0.1)
async def place(order: Order) -> None:
    """Insert the order in its own transaction; repeating it is safe (the token is unique)."""
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(orders).values(**order.model_dump()))
    except IntegrityError:
        pass  # the token was used before: the order exists already (a client's retry)


@app.post("/orders")
async def order(order: Order) -> dict[str, object]:
    await place(order)
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(orders.c.id, orders.c.product_id, orders.c.quantity, orders.c.token).where(
                    orders.c.token == order.token
                )
            )
        ).one()
    if (row.product_id, row.quantity) != (order.product_id, order.quantity):
        raise HTTPException(409, "this token was used for a different order")
    return {"id": row.id, "product_id": row.product_id, "quantity": row.quantity,
            "token": row.token}
