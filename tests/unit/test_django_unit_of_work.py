"""``forksafe.django.unit_of_work``: every spelling a user will try works.

Run in a subprocess with Django configured on SQLite (importing ``forksafe.django``
installs fork callbacks, which would act on the test process's own forks).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("django")

SCRIPT = textwrap.dedent("""
    import os, tempfile
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.path.join(tempfile.mkdtemp(), "db.sqlite3")}},
        INSTALLED_APPS=["forksafe.django"],
    )
    django.setup()
    from django.db import connection

    import forksafe.django as fd

    def query(n):
        with connection.cursor() as cur:
            cur.execute("SELECT %s * 7", [n])
            return cur.fetchone()[0]

    @fd.unit_of_work
    def bare(n):
        "bare"
        return query(n)

    @fd.unit_of_work()
    def called(n):
        return query(n)

    @fd.unit_of_work(idle_check=None)
    def keyword(n):
        return query(n)

    assert bare(1) == 7, "bare decorator"
    assert bare.__name__ == "bare" and bare.__doc__ == "bare"
    assert connection.connection is None, "bare: close_old_connections() ran (CONN_MAX_AGE=0)"
    assert called(2) == 14 and keyword(3) == 21
    with fd.unit_of_work():
        assert query(4) == 28
    assert fd.unit_of_work().idle_check == fd.DEFAULT_IDLE_CHECK
    assert fd.unit_of_work(5.0).idle_check == 5.0
    assert fd.unit_of_work(None).idle_check is None
    assert fd.unit_of_work(idle_check=None).idle_check is None
    assert isinstance(fd.unit_of_work(), fd.UnitOfWork)
    print("ok")
""")


def test_unit_of_work_with_and_without_parentheses() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_fork_before_django_is_configured_reports_nothing() -> None:
    """forksafe.django imported in a process whose Django settings were never configured:
    a forked child has nothing to reset and no internal error."""
    script = textwrap.dedent("""
        import os
        import forksafe, forksafe.django
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, repr(forksafe.internal_errors()).encode())
            os._exit(0)
        os.close(w)
        print(os.read(r, 65536).decode())
        os.waitpid(pid, 0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
