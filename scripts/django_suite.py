"""Django's own test suite, a subset, with and without ``"forksafe.django"`` installed.

Django's tests are not in its wheel: this fetches the sdist of the installed Django version
(``pip download --no-binary :all:``) into ``.venv/django-suite/`` and runs its
``tests/runtests.py`` against private servers (PostgreSQL with Django's pool, PostgreSQL
without it, MariaDB), with the parallel runner forking its workers (``--parallel 2``, start
method fork). Each backend runs twice: ``runtests.py`` as Django ships it, and a copy whose
``ALWAYS_INSTALLED_APPS`` starts with ``"forksafe.django"``. Prints each run's counts and the
tests that fail in one run only; the exit status is 1 when a test fails only with forksafe
(or a run with forksafe ends without Django's summary). Logs: ``.venv/django-suite/logs/``.

Slow (minutes per run on 2 cores): not part of ``scripts/test``. Run it with
``bash scripts/django-suite`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / "django-suite"
LABELS = [
    "backends", "transactions", "transaction_hooks", "select_for_update", "test_runner",
    "test_utils", "queries", "basic", "delete", "update", "model_fields", "postgres_tests",
    "sessions_tests", "cache",
]
BACKENDS = ("postgresql-pool", "postgresql", "mysql")
RUN_TIMEOUT = 3600
ANCHOR = "ALWAYS_INSTALLED_APPS = [\n"
SETTINGS = '''\
"""Settings for Django's runtests.py, written by forksafe's scripts/django_suite.py."""
import json
import os

DATABASES = json.loads(os.environ["FORKSAFE_SUITE_DATABASES"])
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
'''
# Runs runtests.py as __main__ with the start method set to fork (Python 3.14's default,
# forkserver, makes Django's runner fall back to one process).
LAUNCHER = """\
import multiprocessing, os, runpy, sys
multiprocessing.set_start_method("fork")
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def django_tests() -> Path:
    """The ``tests`` directory of the installed Django's sdist (fetched once, cached)."""
    import django

    version = django.__version__
    CACHE.mkdir(parents=True, exist_ok=True)
    found = [p for p in CACHE.glob("*/tests/runtests.py")
             if p.parent.parent.name.lower() == f"django-{version}"]
    if found:
        return found[0].parent
    sdists = [p for p in CACHE.glob("*.tar.gz") if p.name.lower() == f"django-{version}.tar.gz"]
    if not sdists:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"django=={version}", "-d", str(CACHE)],
            check=True,
        )
        sdists = [p for p in CACHE.glob("*.tar.gz")
                  if p.name.lower() == f"django-{version}.tar.gz"]
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(CACHE, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(CACHE, members=members)  # noqa: S202 - Django's own sdist
    return django_tests()


def prepare(tests: Path) -> Path:
    """Write the settings module and the runtests copy with forksafe.django installed."""
    (tests / "forksafe_suite_settings.py").write_text(SETTINGS)
    source = (tests / "runtests.py").read_text()
    if ANCHOR not in source:
        sys.exit(f"django-suite: {tests / 'runtests.py'} has no {ANCHOR.strip()!r} to extend")
    patched = tests / "runtests_forksafe.py"
    patched.write_text(source.replace(ANCHOR, ANCHOR + '    "forksafe.django",\n', 1))
    return patched


def databases(backend: str, server: Any) -> dict[str, Any]:
    if backend.startswith("postgresql"):
        base: dict[str, Any] = {"ENGINE": "django.db.backends.postgresql", "HOST": "127.0.0.1",
                                "PORT": server.port, "USER": "postgres"}
        if backend == "postgresql-pool":
            base["OPTIONS"] = {"pool": True}
    else:
        base = {"ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1",
                "PORT": server.port, "USER": "root", "PASSWORD": "",
                # Django's documented setting for its suite on MySQL (the private server's
                # default character set is latin1)
                "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"}}
    return {"default": {**base, "NAME": "django_default"},
            "other": {**base, "NAME": "django_other"}}


def summarise(log: str) -> dict[str, Any]:
    """Counts from runtests' output, and the ids of the tests that failed or errored."""
    found = re.findall(r"^Found (\d+) test", log, re.M)
    ran = re.findall(r"^Ran (\d+) tests? in ([\d.]+)s", log, re.M)
    verdicts = re.findall(r"^(OK|FAILED)(?: \((.*)\))?$", log, re.M)
    result: dict[str, Any] = {
        "found": int(found[-1]) if found else None,
        "ran": int(ran[-1][0]) if ran else None,
        "verdict": verdicts[-1][0] if verdicts else "no summary",
        "failed": sorted(set(re.findall(r"^(?:FAIL|ERROR|UNEXPECTED SUCCESS): (.+)$", log,
                                        re.M))),
    }
    counts = dict(part.split("=") for part in verdicts[-1][1].split(", ") if "=" in part) if (
        verdicts) else {}
    for key in ("failures", "errors", "skipped", "expected failures", "unexpected successes"):
        result[key] = int(counts.get(key, 0))
    return result


def run(tests: Path, script: Path, *, dbs: dict[str, Any], parallel: int, labels: list[str],
        log_path: Path) -> dict[str, Any]:
    env = {**os.environ, "FORKSAFE_SUITE_DATABASES": json.dumps(dbs)}
    command = [sys.executable, "-c", LAUNCHER, str(script), "--settings",
               "forksafe_suite_settings", "--parallel", str(parallel), "--noinput", *labels]
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=tests, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = summarise(log_path.read_text(errors="replace"))
    result["exit"] = proc.returncode
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def start(backend: str) -> Any:
    sys.path.insert(0, str(ROOT))
    if backend.startswith("postgresql"):
        from forksafe.testing.postgres import PostgreSQL

        return PostgreSQL().start()
    from forksafe.testing.mariadb import MariaDB

    return MariaDB(general_log=False).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="repeatable; default: all three")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("labels", nargs="*", help=f"test labels (default: {' '.join(LABELS)})")
    args = parser.parse_args()
    tests = django_tests()
    patched = prepare(tests)
    logs = CACHE / "logs"
    logs.mkdir(exist_ok=True)
    labels = args.labels or LABELS
    import django

    print(f"Django {django.__version__}, Python {sys.version.split()[0]}, "
          f"--parallel {args.parallel}, labels: {' '.join(labels)}", flush=True)
    summary: dict[str, Any] = {}
    status = 0
    for backend in args.backend or BACKENDS:
        server = start(backend)
        try:
            dbs = databases(backend, server)
            results = {}
            for mode, script in (("without", tests / "runtests.py"), ("with", patched)):
                log_path = logs / f"{backend}-{mode}-forksafe.log"
                results[mode] = result = run(tests, script, dbs=dbs, parallel=args.parallel,
                                             labels=labels, log_path=log_path)
                print(f"{backend:16} {mode:7} forksafe: {result['verdict']:10} found "
                      f"{result['found']}, ran {result['ran']}, failures {result['failures']}, "
                      f"errors {result['errors']}, skipped {result['skipped']}, expected "
                      f"failures {result['expected failures']} ({result['seconds']} s; "
                      f"log {log_path})", flush=True)
        finally:
            server.cleanup()
        without, with_ = set(results["without"]["failed"]), set(results["with"]["failed"])
        only_with = sorted(with_ - without)
        if only_with:
            print(f"  failing only with forksafe: {only_with}")
        if without - with_:
            print(f"  failing only without forksafe: {len(without - with_)} "
                  f"(e.g. {sorted(without - with_)[:3]})")
        if only_with or results["with"]["verdict"] == "no summary":
            status = 1
        summary[backend] = results
    (logs / "summary.json").write_text(json.dumps(summary, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
