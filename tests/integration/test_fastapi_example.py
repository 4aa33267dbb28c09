"""examples/fastapi_app under its real server: gunicorn + uvicorn workers, preload_app.

The app's ``AsyncEngine`` is used at import (``asyncio.run`` creates and seeds the tables in
the gunicorn master), so the four workers fork with a connection in the pool that belongs
to the master and to an event loop that no longer runs. Concurrent real HTTP requests
(listing pages, single products, order writes) must all get exactly their own data, every
acknowledged order must be stored once, and the server log must show no asyncio trouble
("Event loop is closed", "attached to a different loop", a traceback).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

from forksafe.testing.servers import free_port
from tests.integration.test_examples import REQUESTS, _get, hammer

pytestmark = [pytest.mark.postgres, pytest.mark.servers, pytest.mark.timeout(180)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app"
ASYNCIO_TROUBLE = ("Event loop is closed", "attached to a different loop", "Traceback",
                   "different event loop", "was never awaited", "another operation is in "
                   "progress", "ResourceWarning", "unclosed")


@contextlib.contextmanager
def serve(database_url: str, log_path: Path) -> Iterator[str]:
    """Boot the example with its own gunicorn.conf.py; yield its base URL."""
    from mirakuru import HTTPExecutor

    port = free_port()
    with log_path.open("wb") as log:
        executor = HTTPExecutor(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
            url=f"http://127.0.0.1:{port}/health",
            method="GET",
            timeout=90,
            cwd=str(EXAMPLE),
            envvars={"DATABASE_URL": database_url, "PORT": str(port)},
            stop_signal=signal.SIGINT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            executor.start()
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(Exception):
                executor.stop()
            if executor.process is not None:
                executor.kill()


def _post_json(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except HTTPError as exc:
        return exc.code, exc.read()


def _catalogue() -> Any:
    spec = importlib.util.spec_from_file_location("fastapi_example_catalogue",
                                                  EXAMPLE / "catalogue.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fastapi_check(base: str, tokens: list[str]) -> Callable[[int], str | None]:
    catalogue = _catalogue()

    def check(i: int) -> str | None:  # noqa: PLR0911 - one return per thing checked
        kind = i % 3
        if kind == 0:
            page = i % 100 + 1
            status, body = _get(f"{base}/products?page={page}")
            if status != 200:
                return f"page {page}: HTTP {status}"
            data = json.loads(body)
            first = (page - 1) * 50 + 1
            want = [{"id": p, "name": catalogue.product_name(p),
                     "price": catalogue.product_price(p)} for p in range(first, first + 50)]
            if data != {"page": page, "pages": 100, "products": want}:
                return f"page {page}: wrong page"
            return None
        if kind == 1:
            pid = i * 13 % 5000 + 1
            status, body = _get(f"{base}/products/{pid}")
            want = {"id": pid, "name": catalogue.product_name(pid),
                    "price": catalogue.product_price(pid)}
            if status != 200 or json.loads(body) != want:
                return f"product {pid}: HTTP {status} {body[:100]!r}"
            return None
        token = uuid.uuid4().hex
        pid = i % 5000 + 1
        status, body = _post_json(f"{base}/orders",
                                  {"product_id": pid, "quantity": i + 1, "token": token})
        if status != 200:
            return f"order {token}: HTTP {status} {body[:100]!r}"
        answer = json.loads(body)
        if (answer["token"], answer["product_id"], answer["quantity"]) != (token, pid, i + 1):
            return f"order {token}: got {answer}"
        tokens.append(token)
        return None

    return check


def _orders_stored(postgres: Any, tokens: list[str]) -> int:
    stored = {r[0] for r in postgres.execute("SELECT token FROM example_orders")}
    return len(stored & set(tokens))


@pytest.mark.parametrize("driver", ["psycopg_async", "asyncpg"])
def test_fastapi_example_under_uvicorn_workers(postgres: Any, tmp_path: Path,
                                               driver: str) -> None:
    """Every page, product and order right; orders idempotent; a clean server log (with
    psycopg 3's asyncio driver, the example's default, and with asyncpg)."""
    postgres.execute("DROP TABLE IF EXISTS example_orders, example_products")
    url = postgres.url(driver)
    tokens: list[str] = []
    log_path = tmp_path / "gunicorn.log"
    with serve(url, log_path) as base:
        problems = hammer(fastapi_check(base, tokens))
        order = {"product_id": 7, "quantity": 1, "token": "retry-fastapi"}
        sent = [_post_json(f"{base}/orders", order) for _ in range(2)]
        conflict, _ = _post_json(f"{base}/orders", {**order, "quantity": 99})
    log = log_path.read_text(errors="replace")
    assert problems == [], problems[:10]
    assert len(tokens) == REQUESTS // 3
    assert _orders_stored(postgres, tokens) == len(tokens)
    assert [status for status, _ in sent] == [200, 200]
    assert json.loads(sent[0][1]) == json.loads(sent[1][1])
    assert conflict == 409
    assert log.count("Booting worker with pid") >= 4, log[-2000:]
    trouble = [line for line in log.splitlines() if any(t in line for t in ASYNCIO_TROUBLE)]
    assert trouble == [], "\n".join(trouble[:20])


def test_doctor_counts_a_uvicorn_worker_as_concurrent(postgres: Any) -> None:
    """``forksafe doctor`` on the example's gunicorn.conf.py: a uvicorn worker serves many
    requests at once on one thread, so the connection budget is workers x the whole pool
    (4 x 15), not workers x 1 thread."""
    from tests.integration.test_doctor import doctor

    _status, findings, out = doctor("--gunicorn", str(EXAMPLE / "gunicorn.conf.py"),
                                    "--url", postgres.url("psycopg2"))
    messages = [f["message"] for f in findings]
    assert any("worker_class = uvicorn_worker.UvicornWorker" in m for m in messages), out
    assert any("4 worker(s) x 15 connection(s)" in m for m in messages), out
