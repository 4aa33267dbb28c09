"""A Flask + SQLAlchemy shop catalogue, protected by forksafe.

The engine is created, tracked and used at import: the app creates its tables and seeds
5,000 products when the database is empty, under a server lock so that workers importing
it at once (gunicorn without ``preload_app``, uWSGI ``lazy-apps``) do not collide.
gunicorn (``preload_app``) and uWSGI (without ``lazy-apps``) import it once and fork the
workers afterwards; forksafe gives every worker its own connections.

* ``GET /products?page=N``: an HTML listing page, 50 products a page;
* ``GET /products/<id>.json``: one product;
* ``POST /orders`` (form fields ``product_id``, ``quantity``, ``token``): records an order
  and answers it back as JSON. The token makes it idempotent: sending the same order again
  (a client's retry) answers the stored order; the same token for another order is a 409;
* ``GET /health``: 200 ``ok`` when a query of the database succeeds, else 503.

``DATABASE_URL`` picks the database (default: the private MariaDB of
``python -m forksafe.testing.dbserver``, ``mysql+mysqldb://root@127.0.0.1:3307/forksafe``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from catalogue import PER_PAGE, PRODUCTS, product_name, product_price
from flask import Flask, Response, abort, jsonify, render_template_string, request
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

import forksafe

DATABASE_URL = os.environ.get("DATABASE_URL", "mysql+mysqldb://root@127.0.0.1:3307/forksafe")

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

# The one line forksafe asks for: the engine is protected in every forked worker. No
# pool_pre_ping: forksafe checks a connection only when it sat idle long enough to be dead
# (and retires it before the server's wait_timeout), so busy workers pay no round trip.
engine = forksafe.track(create_engine(DATABASE_URL, pool_size=5))

# Knobs for bench/ (unset: the app exactly as above). BENCH_POOL=queue|null|pre_ping picks
# a QueuePool without pre-ping, a NullPool or a QueuePool with pool_pre_ping;
# BENCH_FORKSAFE=0 leaves that engine untracked (what users do instead of forksafe).
if os.environ.get("BENCH_POOL"):
    from sqlalchemy.pool import NullPool

    _kind = os.environ["BENCH_POOL"]
    engine.dispose()
    engine = create_engine(
        DATABASE_URL,
        **({"poolclass": NullPool} if _kind == "null" else {"pool_size": 5}),
        pool_pre_ping=_kind == "pre_ping",
    )
    if os.environ.get("BENCH_FORKSAFE", "1") == "1":
        engine = forksafe.track(engine)


@contextlib.contextmanager
def _setup_lock(conn: Connection) -> Iterator[None]:
    """One process at a time: without preload_app (gunicorn) or with lazy-apps (uWSGI)
    every worker imports the app at once, and two that create the tables or seed together
    fail ('1050 Table already exists', '1213 Deadlock'). A session-level lock of the server
    (MySQL GET_LOCK, PostgreSQL advisory lock) orders them; released on disconnect too."""
    name = conn.dialect.name
    if name in ("mysql", "mariadb"):
        got = conn.execute(text("SELECT GET_LOCK('forksafe_example_setup', 120)")).scalar()
        if got != 1:
            raise RuntimeError("another process held the setup lock for 120 s")
        release = "SELECT RELEASE_LOCK('forksafe_example_setup')"
    elif name == "postgresql":
        conn.execute(text("SELECT pg_advisory_lock(72120101)"))
        release = "SELECT pg_advisory_unlock(72120101)"
    else:
        release = ""
    conn.commit()
    try:
        yield
    finally:
        if release:
            conn.rollback()
            conn.execute(text(release))
            conn.commit()


def _setup() -> None:
    """Create the tables and seed the catalogue once, whichever process comes first (this
    uses the engine at import)."""
    with engine.connect() as conn, _setup_lock(conn):
        metadata.create_all(conn)  # checks first: a table another worker made is kept
        conn.commit()
        if conn.execute(select(func.count()).select_from(products)).scalar() != PRODUCTS:
            conn.execute(orders.delete())
            conn.execute(products.delete())
            conn.execute(
                insert(products),
                [
                    {"id": i, "name": product_name(i), "price": product_price(i)}
                    for i in range(1, PRODUCTS + 1)
                ],
            )
        conn.commit()


_setup()

app = Flask(__name__)

PAGE = """<!doctype html>
<title>Products, page {{ page }}</title>
<h1>Products, page {{ page }} of {{ pages }}</h1>
<table>
<tr><th>#</th><th>name</th><th>price</th></tr>
{% for p in rows %}<tr><td>{{ p.id }}</td><td>{{ p.name }}</td><td>{{ p.price }}</td></tr>
{% endfor %}</table>
"""


@app.get("/health")
def health() -> Response:
    """200 when the database answers a query of the app's own table, else 503 with the cause.

    A health check must touch the database: a process-local view (forksafe.connections())
    cannot know that the server went away.
    """
    try:
        with engine.connect() as conn:
            conn.execute(select(products.c.id).limit(1)).all()
    except Exception as exc:  # any failure is "unhealthy"; the type names it, no password
        return Response(f"database unavailable: {type(exc).__name__}\n", status=503)
    return Response("ok", mimetype="text/plain")


@app.get("/products")
def listing() -> str:
    page = request.args.get("page", 1, type=int)
    pages = (PRODUCTS + PER_PAGE - 1) // PER_PAGE
    if not 1 <= page <= pages:
        abort(404)
    query = (
        select(products.c.id, products.c.name, products.c.price)
        .order_by(products.c.id)
        .limit(PER_PAGE)
        .offset((page - 1) * PER_PAGE)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return render_template_string(PAGE, page=page, pages=pages, rows=rows)


@app.get("/products/<int:product_id>.json")
def product(product_id: int) -> Response:
    with engine.connect() as conn:
        row = conn.execute(select(products).where(products.c.id == product_id)).first()
    if row is None:
        abort(404)
    return jsonify(id=row.id, name=row.name, price=f"{row.price:.2f}")


@app.post("/orders")
def order() -> Response:
    product_id = request.form.get("product_id", type=int)
    quantity = request.form.get("quantity", type=int)
    token = request.form.get("token", "")
    if not product_id or not quantity or not token:
        abort(400)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(orders).values(product_id=product_id, quantity=quantity, token=token)
            )
    except IntegrityError:
        pass  # the token was used before: the order exists already (a client's retry)
    with engine.connect() as conn:
        row = conn.execute(
            select(orders.c.id, orders.c.product_id, orders.c.quantity, orders.c.token).where(
                orders.c.token == token
            )
        ).one()
    if (row.product_id, row.quantity) != (product_id, quantity):
        return Response("this token was used for a different order\n", status=409)
    return jsonify(id=row.id, product_id=row.product_id, quantity=row.quantity, token=row.token)


application = app

# Build once, in the master before it forks, what every worker's first requests would build
# (Flask's URL map and templates, SQLAlchemy's compiled statements): shared by all workers
# instead of a private copy in each (docs/BENCHMARKS.md: 0.41x to 0.42x of the lazy memory
# instead of 0.47x to 0.48x after 4,000 requests per worker). Read-only paths; never raises.
# WARM_UP=0 skips it.
if os.environ.get("WARM_UP", "1") != "0":
    from forksafe.preload import warm_up

    warm_up(app, ["/products/1.json", "/products/2.json", "/products?page=1"])
