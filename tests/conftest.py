"""Shared fixtures: a private MariaDB for the whole session, and the CI rule.

Every test that needs MariaDB gets it from the ``mariadb`` fixture: a private ``mariadbd``
started in a temporary directory on a free port (tests may kill its sessions, change its
settings and restart it). ``--mysql-url`` (or ``FORKSAFE_TEST_MYSQL_URL``) uses an existing
server instead, for the tests that do not need to control it.

Without a server the tests are skipped, except when ``CI`` is set: then a missing server is
an error, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

IN_CI = bool(os.environ.get("CI"))

# Property tests: no per-example deadline (a timing, which a busy machine fails), and in CI
# the same examples every run, so that a red run is always reproducible with the same seed.
settings.register_profile("forksafe", deadline=None)
settings.register_profile("forksafe-ci", deadline=None, derandomize=True)
settings.load_profile("forksafe-ci" if IN_CI else "forksafe")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--mysql-url",
        default=os.environ.get("FORKSAFE_TEST_MYSQL_URL", ""),
        help="use this MySQL/MariaDB server instead of starting a private one "
        "(tests that restart or reconfigure the server are skipped)",
    )


def unavailable(reason: str) -> None:
    """Skip the test, or fail it in CI, where a missing server is a broken setup."""
    if IN_CI:
        pytest.fail(f"CI is set and a required server is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def start_private(make: Callable[[], Any]) -> Any:
    """Start the private server ``make()`` builds; skip (fail in CI) when none can start."""
    try:
        from forksafe.testing.mariadb import ServerUnavailableError
    except ImportError as exc:
        unavailable(f"the dev extra is not installed ({exc}); pip install -e '.[dev]'")
        raise
    server = None
    try:
        server = make()
        server.start()
    except ServerUnavailableError as err:
        if server is not None:
            server.cleanup()
        unavailable(str(err))
    return server


def start_mariadb(*options: str) -> Any:
    """Start a private MariaDB of the test's own (server ``options``, no general log), for
    tests that restart it or change its settings; skip (fail in CI) when none can start."""
    from forksafe.testing.mariadb import MariaDB

    return start_private(lambda: MariaDB(options=options, general_log=False))


@pytest.fixture
def short_timeout() -> Iterator[Any]:
    """A private MariaDB whose wait_timeout is 2 seconds."""
    server = start_mariadb("--wait-timeout=2")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[object]:
    """The session's private MariaDB (a `forksafe.testing.mariadb.MariaDB`).

    Tests that read the server's general log or restart it ask for this fixture; tests that
    only need a server ask for ``mysql_server``, which honours ``--mysql-url``.
    """
    from forksafe.testing.mariadb import MariaDB

    server = start_private(MariaDB)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """The session's private PostgreSQL (a `forksafe.testing.postgres.PostgreSQL`).

    It logs every connection and disconnection with the backend pid, so tests can prove
    from the server side that a session ended or survived.
    """
    from forksafe.testing.postgres import PostgreSQL

    server = start_private(PostgreSQL)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(autouse=True)
def _no_swallowed_errors() -> Iterator[None]:
    """Fork-time code logs errors instead of raising; in tests such an error is a failure."""
    import forksafe

    before = len(forksafe.internal_errors())
    yield
    errors = forksafe.internal_errors()[before:]
    assert not errors, f"forksafe swallowed errors during the test: {errors!r}"


@pytest.fixture(scope="session")
def mysql_server(request: pytest.FixtureRequest) -> Iterator[object]:
    """A MySQL/MariaDB server: the one given by ``--mysql-url``, else the private one."""
    url = request.config.getoption("--mysql-url")
    if not url:
        yield request.getfixturevalue("mariadb")
        return
    from forksafe.testing.mariadb import ExistingServer

    server = ExistingServer(url)
    try:
        server.execute("SELECT 1")
    except Exception as exc:
        unavailable(f"--mysql-url {server.safe_url()} does not answer: {exc}")
    yield server
