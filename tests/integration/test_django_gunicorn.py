"""A Django project under real gunicorn with preload_app, which queries at start-up.

The project (settings built here) runs a query in ``AppConfig.ready()``, so the gunicorn
master holds an open MySQL connection when it forks its workers, and uses persistent
connections (``CONN_MAX_AGE=600``), so each worker keeps using the connection it inherited.
Without forksafe the workers share one session: errors and wrong answers under concurrent
requests. With ``"forksafe.django"`` in INSTALLED_APPS: none.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mirakuru import HTTPExecutor

from forksafe.testing.mariadb import free_port

pytestmark = [pytest.mark.mariadb, pytest.mark.servers]

BIN = Path(sys.executable).parent
REQUESTS = 300


def write_project(root: Path, port: int, protect: bool) -> None:
    """A minimal Django project: settings, urls, one app whose ready() queries."""
    (root / "proj").mkdir()
    (root / "proj" / "__init__.py").write_text("")
    apps = '["shop", "forksafe.django"]' if protect else '["shop"]'
    (root / "proj" / "settings.py").write_text(textwrap.dedent(f"""
        SECRET_KEY = "test-only"
        DEBUG = False
        ALLOWED_HOSTS = ["*"]
        ROOT_URLCONF = "proj.urls"
        INSTALLED_APPS = {apps}
        MIDDLEWARE = []
        USE_TZ = True
        DATABASES = {{"default": {{
            "ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1", "PORT": {port},
            "USER": "root", "PASSWORD": "", "NAME": "forksafe", "CONN_MAX_AGE": 600,
        }}}}
    """))
    (root / "proj" / "urls.py").write_text(textwrap.dedent("""
        from django.urls import path
        from shop.views import answer
        urlpatterns = [path("", answer)]
    """))
    (root / "proj" / "wsgi.py").write_text(textwrap.dedent("""
        import os
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
        from django.core.wsgi import get_wsgi_application
        application = get_wsgi_application()
    """))
    (root / "shop").mkdir()
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "apps.py").write_text(textwrap.dedent("""
        from django.apps import AppConfig

        class ShopConfig(AppConfig):
            name = "shop"

            def ready(self):
                from django.db import connection
                with connection.cursor() as cur:  # a start-up query, in the master
                    cur.execute("SELECT 1")
    """))
    (root / "shop" / "views.py").write_text(textwrap.dedent("""
        import json, os
        from django.db import connection
        from django.http import HttpResponse

        def answer(request):
            n = int(request.GET.get("n", "0"))
            try:
                with connection.cursor() as cur:
                    cur.execute("SELECT %s * 7, SLEEP(0.002)", [n])
                    got = cur.fetchone()[0]
                body = {"n": n, "got": int(got), "pid": os.getpid()}
            except Exception as exc:
                body = {"n": n, "error": f"{type(exc).__name__}: {exc}"}
            return HttpResponse(json.dumps(body), content_type="application/json")
    """))
    (root / "gunicorn.conf.py").write_text("preload_app = True\nworkers = 3\ntimeout = 30\n")


def run(mariadb: Any, tmp_path: Path, protect: bool) -> list[dict[str, Any]]:
    write_project(tmp_path, mariadb.port, protect)
    port = free_port()
    server = HTTPExecutor(
        [str(BIN / "gunicorn"), "-c", str(tmp_path / "gunicorn.conf.py"), "--bind",
         f"127.0.0.1:{port}", "--chdir", str(tmp_path), "proj.wsgi:application"],
        url=f"http://127.0.0.1:{port}/?n=0", status=r"\d+", timeout=60,
        envvars={**os.environ, "PYTHONPATH": str(tmp_path)},
    )

    def one(n: int) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/?n={n}", timeout=20) as r:
                return dict(json.loads(r.read()))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return {"n": n, "error": f"HTTP: {exc!r}"}

    server.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            return list(pool.map(one, range(1, REQUESTS + 1)))
    finally:
        server.stop()


def tally(responses: list[dict[str, Any]]) -> tuple[int, int]:
    errors = sum(1 for r in responses if "error" in r)
    wrong = sum(1 for r in responses if "error" not in r and r["got"] != r["n"] * 7)
    return errors, wrong


def test_without_forksafe_workers_share_the_startup_connection(
    mariadb: Any, tmp_path: Path
) -> None:
    """Without forksafe.django, concurrent requests on preloaded workers fail or get
    another request's answer."""
    errors, wrong = tally(run(mariadb, tmp_path, protect=False))
    print(f"without forksafe: {errors} errors, {wrong} wrong answers of {REQUESTS}")
    assert errors + wrong > 0


def test_with_forksafe_every_answer_is_right(mariadb: Any, tmp_path: Path) -> None:
    """With "forksafe.django" in INSTALLED_APPS, every worker opens its own connection:
    zero errors and zero wrong answers, served by more than one worker."""
    responses = run(mariadb, tmp_path, protect=True)
    errors, wrong = tally(responses)
    print(f"with forksafe: {errors} errors, {wrong} wrong answers of {REQUESTS}")
    assert (errors, wrong) == (0, 0), [r for r in responses if "error" in r][:5]
    assert len({r["pid"] for r in responses}) > 1
