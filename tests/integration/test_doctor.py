"""``forksafe doctor`` against real servers, the examples' configs and broken ones.

Each case runs the real command in a subprocess and checks its findings, its exit status,
that it never prints a traceback and never a password.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.timeout(120)]

FILES = Path(__file__).parent / "doctor_files"
ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]],
                                                                       str]:
    """Run ``forksafe doctor --json ARGS`` from the test files' directory."""
    done = subprocess.run(
        [sys.executable, "-m", "forksafe", "doctor", "--json", *args],
        capture_output=True, text=True, timeout=90, check=False, cwd=FILES,
        env={**os.environ, **(env or {})},
    )
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    return done.returncode, json.loads(done.stdout), out


def by_severity(findings: list[dict[str, Any]], severity: str) -> list[str]:
    return [f["message"] for f in findings if f["severity"] == severity]


def test_pool_capacity_against_mariadb_max_connections(mariadb: Any) -> None:
    """workers x (pool_size + max_overflow, capped by threads) above max_connections is
    an error (exit 1); the server's wait_timeout is reported with a pool_recycle fix."""
    url = mariadb.url("pymysql")
    status, findings, out = doctor("--url", url, "--workers", "100")  # 1 thread: 1 each
    assert status == 0, out
    assert any("100 worker(s) x 1 connection(s)" in f["message"] for f in findings), out
    status, findings, _ = doctor("--url", url, "--workers", "100", "--threads", "20")
    assert status == 1
    errors = by_severity(findings, "error")
    assert any("= 1500 connections; the server allows 1000" in e for e in errors), findings
    assert any("wait_timeout = 28800" in f["message"] and "pool_recycle" in f["fix"]
               for f in findings), findings
    assert findings[0]["severity"] == "error"  # most serious first
    status, findings, _ = doctor("--url", url, "--workers", "4")
    assert status == 0, findings


def test_postgres_idle_timeout_and_capacity(postgres: Any) -> None:
    """PostgreSQL: idle_session_timeout set on the database is reported with a fix; the pool
    must fit max_connections minus the reserved superuser slots."""
    postgres.execute("DROP DATABASE IF EXISTS doctor_idle", database="postgres")
    postgres.execute("CREATE DATABASE doctor_idle", database="postgres")
    postgres.execute("ALTER DATABASE doctor_idle SET idle_session_timeout = '45s'",
                     database="postgres")
    url = postgres.url("psycopg2", database="doctor_idle")
    status, findings, _ = doctor("--url", url, "--workers", "20", "--threads", "15")
    assert status == 1
    assert any("idle_session_timeout = 45 s" in m for m in by_severity(findings, "warning"))
    assert any("= 300 connections; the server allows 297" in m
               for m in by_severity(findings, "error")), findings


def test_unreachable_server_is_one_line_without_password() -> None:
    """An unreachable server is one error finding naming the masked URL, never the password."""
    from forksafe.testing.mariadb import free_port

    url = f"mysql+pymysql://app:TopSecret42@127.0.0.1:{free_port()}/db"
    status, findings, out = doctor("--url", url)
    assert status == 1
    assert "TopSecret42" not in out
    assert findings[0]["message"].startswith("cannot connect to mysql+pymysql://app:***@")


def test_examples_configs_are_clean() -> None:
    """The shipped examples (gunicorn preload with forksafe's post_fork, uWSGI with
    import = forksafe.uwsgi) have no error finding."""
    status, findings, _ = doctor(
        "--gunicorn", str(EXAMPLES / "flask_app" / "gunicorn.conf.py"),
        "--uwsgi", str(EXAMPLES / "flask_app" / "uwsgi.ini"),
    )
    assert status == 0, findings
    assert any("forksafe runs in every worker" in f["message"] for f in findings)
    assert any("preload_app with forksafe's post_fork" in f["message"] for f in findings)


def test_broken_gunicorn_config() -> None:
    """preload_app without forksafe's hook and timeout = 0 are reported with fixes; a config
    that raises is one error line."""
    status, findings, _ = doctor("--gunicorn", "gunicorn_preload_nohook.conf.py")
    warnings = by_severity(findings, "warning")
    assert any("preload_app = True without forksafe's post_fork" in m for m in warnings)
    assert any("timeout = 0" in m for m in warnings)
    assert status == 0
    status, findings, _ = doctor("--gunicorn", "gunicorn_raises.conf.py")
    assert status == 1
    assert "RuntimeError: config error" in findings[0]["message"]


def test_broken_uwsgi_configs() -> None:
    """uWSGI forking a preloaded app without a forksafe hook is an error; no master, threads
    without enable-threads and no harakiri are warnings; lazy-apps is safe but costs memory;
    a file that is not an ini file and a missing file are one error line each."""
    status, findings, _ = doctor("--uwsgi", "uwsgi_nohook.ini")
    assert status == 1
    assert "no forksafe hook runs in the workers" in findings[0]["message"]
    warnings = " | ".join(by_severity(findings, "warning"))
    for expected in ("no master", "without enable-threads", "no harakiri"):
        assert expected in warnings, warnings
    status, findings, _ = doctor("--uwsgi", "uwsgi_lazy.ini")
    assert status == 0
    assert any("lazy-apps" in f["message"] and "memory" in f["message"] for f in findings)
    for bad in ("uwsgi_not_ini.ini", "missing.ini"):
        status, findings, _ = doctor("--uwsgi", bad)
        assert status == 1
        assert len(findings) == 1, findings


def test_app_import_finds_untracked_engine_with_connections(mariadb: Any) -> None:
    """An app that opens an untracked engine's connection at import is exactly one error
    (its pooled connection is reported with the engine, not again on its own); the same app
    with track() is fine; an app whose import fails is one error line."""
    mariadb.execute("SELECT 1")  # the apps connect while they load: the server must answer
    env = {"DATABASE_URL": mariadb.url("pymysql")}
    status, findings, out = doctor("--app", "untracked_app", env=env)
    assert [(f["severity"], f["check"]) for f in findings] == [("error", "app")], out
    assert findings[0]["message"].startswith("engine mysql+pymysql://root@"), out
    assert findings[0]["message"].endswith(
        "has 1 connection(s) open at import and is not tracked: a fork shares them between "
        "workers"), out
    assert status == 1, out
    status, findings, out = doctor("--app", "tracked_app", env=env)
    assert status == 0, out
    assert any("is tracked" in f["message"] for f in findings), out
    status, findings, out = doctor("--app", "failing_app")
    assert status == 1, out
    assert len(findings) == 1, out
    assert "ImportError: cannot import name 'settings'" in findings[0]["message"], out


def test_findings_order_is_stable(mariadb: Any, tmp_path: Path) -> None:
    """Findings of equal severity come in the same order whatever the garbage collector's
    order: engines (by URL) before stray connections, every run alike."""
    names = ("zeta", "alpha", "mid")
    for name in names:
        mariadb.execute(f"CREATE DATABASE IF NOT EXISTS doctor_{name}")
    base = mariadb.url("pymysql", database="")
    (tmp_path / "many_engines.py").write_text(
        "import pymysql\n"
        "from sqlalchemy import create_engine, text\n"
        f"engines = [create_engine({base!r} + 'doctor_' + name) for name in {names!r}]\n"
        "for engine in engines:\n"
        "    with engine.connect() as conn:\n"
        "        conn.execute(text('SELECT 1'))\n"
        f"raw = pymysql.connect(**{mariadb.connect_kwargs()!r})\n"
    )
    runs = []
    for seed in ("0", "1", "2"):
        done = subprocess.run(
            [sys.executable, "-m", "forksafe", "doctor", "--json", "--app", "many_engines"],
            capture_output=True, text=True, timeout=90, check=False, cwd=tmp_path,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert done.returncode == 1, done.stdout + done.stderr
        runs.append([f["message"] for f in json.loads(done.stdout)])
    expected = [f"doctor_{name} has 1 connection(s)" for name in sorted(names)]
    first = runs[0]
    assert len(first) == 4, first
    for message, db in zip(first, expected, strict=False):  # the engines, then the raw one
        assert db in message, first
    assert first[3].startswith("a PyMySQL connection is open at import"), first
    assert runs[1] == first, runs
    assert runs[2] == first, runs


@pytest.mark.parametrize(
    "args",
    [
        ("--uwsgi", str(ROOT / "uwsgi.ini.example")),
        ("--uwsgi", str(EXAMPLES / "flask_app" / "uwsgi.ini")),
        ("--uwsgi", str(EXAMPLES / "pyramid_app" / "uwsgi.ini")),
        ("--gunicorn", str(EXAMPLES / "flask_app" / "gunicorn.conf.py")),
    ],
)
def test_the_configs_we_ship_pass_the_doctor(args: tuple[str, str]) -> None:
    """The example configs users copy get no warning and no error from forksafe doctor."""
    status, findings, out = doctor(*args)
    assert status == 0, out
    assert [f for f in findings if f["severity"] in ("warning", "error")] == [], out


# -- uWSGI's ini, read as uWSGI reads it ---------------------------------------------------------
UWSGI_CASES = [
    # (ini spec, does uWSGI import forksafe.uwsgi, is a value unimportable)
    ("uwsgi_import_comment.ini", False, True),
    ("uwsgi_import_comma.ini", False, True),
    ("uwsgi_import_typo.ini", False, True),
    ("uwsgi_pyimport.ini", True, False),
    ("uwsgi_sections.ini:production", True, False),
]


@pytest.mark.parametrize(("spec", "hooked", "unimportable"), UWSGI_CASES)
def test_uwsgi_imports_are_read_as_uwsgi_reads_them(spec: str, hooked: bool,
                                                    unimportable: bool) -> None:
    """A comment or a comma after `import =` is part of the value (uWSGI cannot import it:
    an error, and forksafe does not run); pyimport is import; every import line applies;
    %(option) placeholders, sections chosen by name and `ini =` includes are followed."""
    status, findings, out = doctor("--uwsgi", spec)
    runs = any("forksafe runs in every worker" in f["message"] for f in findings)
    assert runs is hooked, out
    cannot = [f for f in findings if "uWSGI cannot import" in f["message"]]
    for finding in cannot:
        assert "comment on a line of its own" in finding["fix"], out
    cannot += [f for f in findings if "forksafe has no module" in f["message"]]
    assert bool(cannot) is unimportable, out
    for finding in cannot:
        assert finding["severity"] == "error", out
    assert status == (0 if hooked else 1), out


@pytest.mark.servers
@pytest.mark.parametrize(("spec", "hooked", "unimportable"), UWSGI_CASES)
def test_real_uwsgi_agrees_with_the_doctor(spec: str, hooked: bool, unimportable: bool,
                                           tmp_path: Path) -> None:
    """The same files under the real uWSGI: it imports forksafe.uwsgi exactly when the
    doctor says forksafe runs, and logs ModuleNotFoundError exactly when it says uWSGI
    cannot import a value."""
    from forksafe.testing.servers import HarnessError, find_uwsgi

    try:
        uwsgi = find_uwsgi()
    except HarnessError as exc:
        pytest.skip(str(exc))
    marker = tmp_path / "imported"
    (tmp_path / "app.py").write_text(
        "import os, sys\n"
        "with open(os.environ['PROBE_MARKER'], 'w') as fh:\n"
        "    fh.write(str('forksafe.uwsgi' in sys.modules))\n"
        "raise RuntimeError('probe: stop here')\n"
    )
    env = {**os.environ, "PROBE_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [uwsgi, "--ini", spec, "--need-app", "--http-socket", "127.0.0.1:0",
         "--pythonpath", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False, cwd=FILES, env=env,
    )
    log = done.stdout + done.stderr
    assert marker.read_text() == str(hooked), log
    assert ("ModuleNotFoundError" in log) is unimportable, log


def test_lazy_or_no_preload_makes_an_untracked_engine_at_import_no_error(mariadb: Any) -> None:
    """Whether the server forks after loading the app decides: with lazy-apps, or gunicorn
    without preload_app, an untracked engine open at import is shared by nobody (info, exit
    0); with uWSGI loading once and forking it is an error."""
    mariadb.execute("SELECT 1")
    env = {"DATABASE_URL": mariadb.url("pymysql")}
    for config in (("--uwsgi", "uwsgi_lazy.ini"), ("--gunicorn", "gunicorn_nopreload.conf.py")):
        status, findings, out = doctor(*config, "--app", "untracked_app", env=env)
        assert status == 0, out
        assert by_severity(findings, "error") == [], out
        engine = next(f for f in findings if f["message"].startswith("engine "))
        assert engine["severity"] == "info", out
        assert "not shared here" in engine["message"], out
    status, findings, out = doctor("--uwsgi", "uwsgi_pyimport.ini", "--app", "untracked_app",
                                   env=env)
    assert status == 1, out
    assert any("a fork shares them" in m for m in by_severity(findings, "error")), out


def test_connection_budget_uses_the_apps_pools_threads_and_the_master(mariadb: Any) -> None:
    """The budget is what the app's engines can open (pool_size 2 + max_overflow 0), capped
    by threads per worker, plus what the master keeps: 4 single-threaded workers need 4 + 1,
    not 4 x (5 + 10) = 60, against max_connections = 25."""
    server = _private_mariadb("--max-connections=25")
    try:
        url = server.url("pymysql")
        server.execute("SELECT 1")
        env = {"DATABASE_URL": url}
        status, findings, out = doctor("--uwsgi", "uwsgi_pyimport.ini", "--workers", "4",
                                       "--app", "small_pool_app", "--url", url, env=env)
        assert status == 1, out  # the untracked engine is shared: that is its own error
        budget = next(f for f in findings if "connections; the server allows" in f["message"])
        assert "4 worker(s) x 1 connection(s)" in budget["message"], out
        assert "+ 1 held by the master = 5 connections; the server allows 25" in \
            budget["message"], out
        assert budget["severity"] == "info", out
        _status, findings, out = doctor("--workers", "4", "--threads", "8", "--app",
                                       "small_pool_app", "--url", url, env=env)
        budget = next(f for f in findings if "connections; the server allows" in f["message"])
        assert "4 worker(s) x 2 connection(s)" in budget["message"], out
    finally:
        server.cleanup()


def _private_mariadb(*options: str) -> Any:
    from tests.conftest import start_mariadb

    server = start_mariadb(*options)
    server.execute("CREATE DATABASE IF NOT EXISTS forksafe", database="")
    return server


def test_idle_limit_advice_a_person_would_follow(tmp_path: Path) -> None:
    """wait_timeout = 3: raise it (no pool_recycle=1); a tracked engine gets no pool_recycle
    advice; a gunicorn timeout or uWSGI harakiri longer than the idle limit is a warning."""
    server = _private_mariadb("--wait-timeout=3")
    try:
        url = server.url("pymysql")
        status, findings, out = doctor("--url", url)
        idle = next(f for f in findings if "wait_timeout = 3 s" in f["message"])
        assert "pool_recycle" not in idle["fix"], out
        assert "raise wait_timeout" in idle["fix"], out
        status, findings, out = doctor("--url", url, "--uwsgi", "uwsgi_pyimport.ini")
        late = [f for f in findings if "harakiri = 30 s is longer than wait_timeout = 3 s"
                in f["message"]]
        assert len(late) == 1, out
        assert late[0]["severity"] == "warning", out
        assert late[0]["fix"] == "raise wait_timeout above 30 s", out  # not "harakiri < 3 s"
    finally:
        server.cleanup()
    server = _private_mariadb("--wait-timeout=300")
    try:
        url = server.url("pymysql")
        env = {"DATABASE_URL": url}
        status, findings, out = doctor("--url", url, env=env)
        idle = next(f for f in findings if "wait_timeout = 300 s" in f["message"])
        assert "pool_recycle=270" in idle["fix"], out
        status, findings, out = doctor("--app", "tracked_app", "--url", url, env=env)
        assert status == 0, out
        idle = next(f for f in findings if "wait_timeout = 300 s" in f["message"])
        assert "pool_recycle" not in idle["fix"], out
        assert idle["severity"] == "info", out
        assert "tracked engine(s)" in idle["message"], out
        _status, findings, out = doctor("--url", url, "--gunicorn", "gunicorn_nopreload.conf.py")
        assert not any("is longer than wait_timeout" in f["message"] for f in findings), out
    finally:
        server.cleanup()


def test_django_project_budget_and_advice(mariadb: Any) -> None:
    """A Django project: the budget is its aliases per thread (not SQLAlchemy's 5 + 10), the
    idle-limit advice is about CONN_MAX_AGE and unit_of_work (not pool_recycle or track),
    and a missing 'forksafe.django' is named."""
    env = {"DB_PORT": str(mariadb.port)}
    status, findings, out = doctor("--app", "django_app", "--workers", "4", "--threads", "2",
                                   "--url", mariadb.url("pymysql"), env=env)
    assert status == 0, out
    messages = " | ".join(f["message"] for f in findings)
    assert "default (mysql, CONN_MAX_AGE=60), replica (mysql, CONN_MAX_AGE=60)" in messages, out
    assert "4 worker(s) x 4 connection(s) [Django aliases default, replica x 2 thread(s) per " \
        "worker] = 16 connections" in messages, out
    idle = next(f for f in findings if "wait_timeout =" in f["message"])
    assert "CONN_MAX_AGE (60, 60) is below it" in idle["message"], out
    assert "unit_of_work" in idle["fix"], out
    assert "pool_recycle" not in idle["fix"], out
    assert "track" not in idle["fix"], out
    missing = [f for f in findings if "'forksafe.django' is not in INSTALLED_APPS" in f["message"]]
    assert [f["severity"] for f in missing] == ["warning"], out


def test_docs_show_what_the_doctor_prints() -> None:
    """Every output in docs/DOCTOR.md that needs no database is what the doctor prints
    today, word for word (the shipped configs from the repository's root, the broken ones
    from doctor_files/)."""
    import re
    import shlex

    text = (ROOT / "docs" / "DOCTOR.md").read_text()
    blocks = re.findall(r"```text\n\$ (forksafe doctor [^\n]*)\n(.*?)\n\(exit status (\d)\)\n```",
                        text, flags=re.S)
    offline = [b for b in blocks if "--url" not in b[0] and "--app" not in b[0]]
    assert len(offline) >= 9, blocks
    for command, shown, status in offline:
        args = shlex.split(command)[2:]
        cwd = ROOT if any(a.startswith(("examples/", "uwsgi.ini.example")) for a in args) \
            else FILES
        done = subprocess.run([sys.executable, "-m", "forksafe", "doctor", *args],
                              capture_output=True, text=True, timeout=90, check=False, cwd=cwd)
        assert done.stdout.rstrip("\n") == shown, (command, done.stdout)
        assert str(done.returncode) == status, command
