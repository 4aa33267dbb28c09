"""The examples boot under their real servers and serve concurrent requests without a fault.

``examples/flask_app`` under gunicorn (its gunicorn.conf.py: preload_app, 4 workers) and
under uWSGI (its uwsgi.ini: master, 4 processes), ``examples/pyramid_app`` under uWSGI (its
uwsgi.ini). Each app creates and uses its engine at import, so the workers fork with an
open connection; the configs protect them with forksafe. Concurrent requests (listing pages,
single records, order writes) must all succeed and each must get exactly its own data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest

from forksafe.testing.servers import find_uwsgi, free_port
from tests.integration._liveness import wait_until

pytestmark = [pytest.mark.mariadb, pytest.mark.servers, pytest.mark.timeout(180)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REQUESTS = 300
CONCURRENCY = 24


@contextlib.contextmanager
def serve(example: str, server: str, database_url: str, *, loads_per_worker: bool = False,
          log_lines: list[str] | None = None) -> Iterator[str]:
    """Boot ``examples/<example>`` with its own config under ``server``; yield its base URL.

    ``loads_per_worker``: every worker imports the app itself after fork (gunicorn without
    ``preload_app``, uWSGI with ``lazy-apps``), so the workers start it concurrently.
    ``log_lines`` receives the server's log when it stops.
    """
    from mirakuru import HTTPExecutor

    directory = EXAMPLES / example
    port = free_port()
    if server == "gunicorn" and loads_per_worker:  # the config's preload_app cannot be undone
        command = [sys.executable, "-m", "gunicorn", "--workers", "4", "--bind",
                   f"127.0.0.1:{port}", "app:app"]
    elif server == "gunicorn":
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    else:
        command = [find_uwsgi(), "--ini", "uwsgi.ini"]
        if sys.prefix != sys.base_prefix:
            command += ["--home", sys.prefix]
        if loads_per_worker:
            command += ["--lazy-apps"]
    log = (directory / f".{server}-{port}.log").open("wb")
    executor = HTTPExecutor(
        command,
        url=f"http://127.0.0.1:{port}/health",
        method="GET",
        timeout=60,
        cwd=str(directory),
        envvars={"DATABASE_URL": database_url, "PORT": str(port)},
        stop_signal=signal.SIGINT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        executor.start()
        yield f"http://127.0.0.1:{port}"
        if loads_per_worker and server == "uwsgi":
            # Every worker has imported the app before the stop: SIGINT goes to the whole
            # process group, and a worker still importing (a busy machine) would print the
            # KeyboardInterrupt it caused, maybe before the master's line that ends the log
            # the test judges. (gunicorn's workers handle SIGINT from before the import.)
            found = re.search(r"^processes = (\d+)", (directory / "uwsgi.ini").read_text(), re.M)
            workers = int(found[1]) if found else 1
            wait_until(lambda: Path(log.name).read_text(errors="replace").count(
                "WSGI app 0 (mountpoint='') ready") >= workers,
                f"all {workers} uWSGI workers loaded the app", timeout=120.0)
    finally:
        with contextlib.suppress(Exception):
            executor.stop()
        if executor.process is not None:
            executor.kill()
        log.close()
        if log_lines is not None:
            log_lines += Path(log.name).read_text(errors="replace").splitlines()
        Path(log.name).unlink(missing_ok=True)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, fields: dict[str, Any]) -> tuple[int, bytes]:
    try:
        with urlopen(url, data=urlencode(fields).encode(), timeout=10) as response:
            return response.status, response.read()
    except HTTPError as exc:
        return exc.code, exc.read()


def hammer(check: Callable[[int], str | None]) -> list[str]:
    """Run ``check(i)`` for every request, concurrently; return the problems it reported."""
    problems: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            problem = check(i)
        except Exception as exc:
            problem = f"request {i}: {type(exc).__name__}: {exc}"
        if problem:
            with lock:
                problems.append(problem)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(REQUESTS)))
    return problems


def flask_check(base: str, tokens: list[str]) -> Callable[[int], str | None]:
    """Listing pages, single products and orders, each checked against the seeded data."""
    spec = importlib.util.spec_from_file_location(
        "flask_example_catalogue", EXAMPLES / "flask_app" / "catalogue.py"
    )
    assert spec is not None
    assert spec.loader is not None
    catalogue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(catalogue)  # the example's deterministic names and prices

    def check(i: int) -> str | None:  # noqa: PLR0911 - one return per thing checked
        kind = i % 3
        if kind == 0:
            page = i % 100 + 1
            status, body = _get(f"{base}/products?page={page}")
            if status != 200:
                return f"page {page}: HTTP {status}"
            text = body.decode()
            first = (page - 1) * 50 + 1
            wanted = [catalogue.product_name(p) for p in (first, first + 25, first + 49)]
            if f"page {page} of 100" not in text or not all(w in text for w in wanted):
                return f"page {page}: wrong page"
            return None
        if kind == 1:
            pid = i * 13 % 5000 + 1
            status, body = _get(f"{base}/products/{pid}.json")
            want = {"id": pid, "name": catalogue.product_name(pid),
                    "price": catalogue.product_price(pid)}
            if status != 200 or json.loads(body) != want:
                return f"product {pid}: HTTP {status} {body[:100]!r}"
            return None
        token = uuid.uuid4().hex
        pid = i % 5000 + 1
        status, body = _post(f"{base}/orders", {"product_id": pid, "quantity": i, "token": token})
        if status != 200:
            return f"order {token}: HTTP {status} {body[:100]!r}"
        answer = json.loads(body)
        if (answer["token"], answer["product_id"], answer["quantity"]) != (token, pid, i):
            return f"order {token}: got {answer}"
        tokens.append(token)
        return None

    return check


def _orders_stored(database_url: str, tokens: list[str]) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            stored = {r[0] for r in conn.execute(text("SELECT token FROM example_orders"))}
    finally:
        engine.dispose()
    return len(stored & set(tokens))


@pytest.mark.parametrize("server", ["gunicorn", "uwsgi"])
def test_flask_example(mariadb: Any, server: str) -> None:
    """The Flask example under gunicorn and uWSGI: every page, product and order is right,
    and every acknowledged order is in the database."""
    url = mariadb.url()
    tokens: list[str] = []
    with serve("flask_app", server, url) as base:
        problems = hammer(flask_check(base, tokens))
        # an order sent again (a client's retry) is answered, not stored twice; the same
        # token for another order is refused
        order = {"product_id": 7, "quantity": 1, "token": f"retry-{server}"}
        sent = [_post(f"{base}/orders", order) for _ in range(2)]
        conflict, _ = _post(f"{base}/orders", {**order, "quantity": 99})
    assert problems == [], problems[:10]
    assert len(tokens) == REQUESTS // 3
    assert _orders_stored(url, tokens) == len(tokens)
    assert [status for status, _ in sent] == [200, 200]
    assert json.loads(sent[0][1]) == json.loads(sent[1][1])
    assert _orders_stored(url, [order["token"]]) == 1
    assert conflict == 409


def pyramid_check(base: str) -> Callable[[int], str | None]:
    """Single users and pages of users, each checked against the seeded data."""

    def check(i: int) -> str | None:
        if i % 2:
            uid = i * 7 % 2000 + 1
            status, body = _get(f"{base}/users/{uid}")
            want = {"id": uid, "login": f"user{uid:05d}", "email": f"user{uid:05d}@example.org"}
            if status != 200 or json.loads(body) != want:
                return f"user {uid}: HTTP {status} {body[:100]!r}"
            return None
        offset = i % 1980
        status, body = _get(f"{base}/users?offset={offset}")
        data = json.loads(body) if status == 200 else None
        ids = [u["id"] for u in data["users"]] if data else None
        if ids != list(range(offset + 1, offset + 21)):
            return f"users?offset={offset}: HTTP {status} ids {ids}"
        return None

    return check


def test_pyramid_example_under_uwsgi(mariadb: Any) -> None:
    """The Pyramid + MySQLdb example under uWSGI (master, 4 processes): every answer right."""
    with serve("pyramid_app", "uwsgi", mariadb.url()) as base:
        problems = hammer(pyramid_check(base))
    assert problems == [], problems[:10]


@pytest.mark.parametrize(("example", "server"), [("flask_app", "gunicorn"),
                                               ("flask_app", "uwsgi"), ("pyramid_app", "uwsgi")])
def test_examples_when_every_worker_loads_them(mariadb: Any, example: str, server: str) -> None:
    """gunicorn without preload_app and uWSGI with lazy-apps: four workers import the app at
    once against an empty database. Each creates the tables and seeds them only if no other
    did (no '1050 Table already exists', no '1213 Deadlock', no worker that fails to boot),
    and every answer is right."""
    database = f"example_race_{uuid.uuid4().hex[:8]}"
    mariadb.execute(f"CREATE DATABASE {database}", database="")
    url = mariadb.url(database=database)
    tokens: list[str] = []
    log: list[str] = []
    try:
        with serve(example, server, url, loads_per_worker=True, log_lines=log) as base:
            if example == "flask_app":
                problems = hammer(flask_check(base, tokens))
            else:
                problems = hammer(pyramid_check(base))
    finally:
        mariadb.execute(f"DROP DATABASE IF EXISTS {database}", database="")
    assert problems == [], problems[:10]
    # Judge the log up to the stop signal: a worker still importing the app on a busy machine
    # when the test stops the server prints the KeyboardInterrupt our SIGINT caused.
    text = "\n".join(log)
    for stop in ("SIGINT/SIGTERM received", "Handling signal: int"):
        text = text.split(stop)[0]
    for bad in ("Traceback", "1050", "1213", "Worker failed to boot", "Deadlock"):
        assert bad not in text, text[-3000:]


@pytest.mark.parametrize(("example", "server"), [("flask_app", "gunicorn"),
                                               ("pyramid_app", "uwsgi")])
def test_health_touches_the_database(mariadb: Any, example: str, server: str) -> None:
    """/health answers 200 only when the database answers: it runs a query, so a database
    that is gone is a 503 naming the cause, not a cheerful 'ok'."""
    database = f"example_health_{uuid.uuid4().hex[:8]}"
    mariadb.execute(f"CREATE DATABASE {database}", database="")
    url = mariadb.url(database=database)
    try:
        with serve(example, server, url) as base:
            status, body = _get(f"{base}/health")
            assert (status, body) == (200, b"ok"), body
            mariadb.execute(f"DROP DATABASE {database}", database="")
            status, body = _get(f"{base}/health")
            assert status == 503, body
            assert b"database" in body, body
    finally:
        mariadb.execute(f"DROP DATABASE IF EXISTS {database}", database="")
