"""Unit tests of forksafe.errors: classifying, explaining and logging disconnect errors."""

from __future__ import annotations

import logging
import sys

import MySQLdb
import pymysql
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc

from forksafe import errors


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (2006, "mysql-2006"),
        (2013, "mysql-2013"),
        (2014, "mysql-2014"),
        (2055, "mysql-2055"),
        (1927, "mysql-killed"),
        (4031, "mysql-4031"),
        (2003, "cant-connect"),
    ],
)
def test_mysql_codes(code: int, expected: str) -> None:
    """A mysqlclient error is classified by its code, whatever the message says."""
    kind = errors.classify(MySQLdb.OperationalError(code, "whatever the server said"))
    assert kind is not None
    assert kind.code == expected


def test_sqlalchemy_wrapper_is_looked_through() -> None:
    """SQLAlchemy's OperationalError is classified by the DBAPI error it wraps (.orig)."""
    orig = MySQLdb.OperationalError(2013, "Lost connection to MySQL server during query")
    wrapped = sa_exc.OperationalError("SELECT 1", {}, orig)
    kind = errors.classify(wrapped)
    assert kind is errors.LOST_DURING_QUERY
    assert kind.disconnect
    assert kind.retry_safe


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("SSL error: decryption failed or bad record mac", "pg-ssl-bad-mac"),
        ("SSL SYSCALL error: EOF detected", "pg-ssl-eof"),
        ("server closed the connection unexpectedly\n\tThis probably means the server "
         "terminated abnormally", "pg-closed"),
        ("terminating connection due to administrator command", "pg-terminated"),
        ("FATAL:  terminating connection due to idle-session timeout", "pg-idle-timeout"),
        ("connection already closed", "pg-already-closed"),
        ("(2006, 'MySQL server has gone away')", "mysql-2006"),
        ("(2014, \"Commands out of sync; you can't run this command now\")", "mysql-2014"),
        ("This result object does not return rows. It has been closed automatically.",
         "sa-result-closed"),
        ("Could not locate column in row for column 'users.id'", "sa-no-such-column"),
    ],
)
def test_messages(message: str, expected: str) -> None:
    """A bare message (a log line) is classified by its text."""
    kind = errors.classify(message)
    assert kind is not None
    assert kind.code == expected


def test_fork_symptoms_are_not_retry_safe() -> None:
    """Errors that mean a shared session (2014, bad record mac, wrong result) are never retried."""
    for kind in (errors.OUT_OF_SYNC, errors.PG_BAD_MAC, errors.RESULT_CLOSED,
                 errors.NO_SUCH_COLUMN, errors.MALFORMED):
        assert not kind.retry_safe, kind.code
    assert errors.classify(sa_exc.ResourceClosedError("This result object does not return rows"))
    assert errors.classify(sa_exc.NoSuchColumnError("x")) is errors.NO_SUCH_COLUMN


def test_pymysql_closed_connection() -> None:
    """PyMySQL's InterfaceError(0, '') is a closed connection, a disconnect."""
    assert errors.classify(pymysql.err.InterfaceError(0, "")) is errors.PYMYSQL_CLOSED
    assert errors.is_disconnect(pymysql.err.OperationalError(2013, "Lost connection"))


def test_unrelated_errors_are_not_classified() -> None:
    """Ordinary SQL errors (syntax, duplicate key) are not explained as disconnects."""
    assert errors.classify(MySQLdb.ProgrammingError(1064, "You have an error in your SQL")) is None
    assert errors.classify(MySQLdb.IntegrityError(1062, "Duplicate entry '1' for key")) is None
    assert errors.classify(ValueError("nope")) is None
    assert not errors.is_disconnect(KeyError("x"))


def test_explain_names_cause_and_fix() -> None:
    """The explanation is one line with the error, a likely cause and a fix."""
    line = errors.explain(MySQLdb.OperationalError(2006, "MySQL server has gone away"))
    assert line is not None
    assert "\n" not in line
    assert "wait_timeout" in line
    assert "Fix: " in line
    assert errors.explain("syntax error at or near") is None


def test_report_logs_once_per_cause(caplog: pytest.LogCaptureFixture) -> None:
    """The same cause is logged once per process; a different cause is logged again."""
    errors.reset_reported()
    caplog.set_level(logging.INFO, logger="forksafe")
    for _ in range(5):
        errors.report(MySQLdb.OperationalError(2006, "gone away"), "Engine(x)")
    errors.report(MySQLdb.OperationalError(2013, "lost"), "Engine(x)")
    lines = [r.getMessage() for r in caplog.records if r.name == "forksafe"]
    assert len(lines) == 2
    assert "2006" in lines[0]
    assert "2013" in lines[1]
    errors.reset_reported()


def test_report_never_logs_a_password(caplog: pytest.LogCaptureFixture) -> None:
    """A password in the driver's message (URL or key=value) never reaches the log."""
    errors.reset_reported()
    caplog.set_level(logging.INFO, logger="forksafe")
    err = MySQLdb.OperationalError(
        2003, "Can't connect to mysql://app:s3cr3t-pw@db:3306/app (password=s3cr3t-pw)"
    )
    errors.report(err, "Engine(mysql://app:***@db/app)")
    text = caplog.text
    assert "Can't connect" in text or "Cannot connect" in text
    assert "s3cr3t-pw" not in text
    errors.reset_reported()


_PASSWORDS = st.text(
    alphabet=st.characters(
        whitelist_categories=("L", "N", "P", "S"), blacklist_characters="@/'\",;)}"
    ),
    min_size=1,
    max_size=30,
)


@given(user=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), password=_PASSWORDS)
def test_mask_secrets_hides_url_passwords(user: str, password: str) -> None:
    """Whatever the password, a URL with it comes out with the password masked."""
    text = f"could not connect to mysql+mysqldb://{user}:{password}@db.example:3306/app"
    masked = errors.mask_secrets(text)
    # exactly: a containment check cannot tell a password of asterisks from the mask
    assert masked == f"could not connect to mysql+mysqldb://{user}:***@db.example:3306/app"


@given(password=_PASSWORDS.filter(lambda p: ":" not in p and "=" not in p))
def test_mask_secrets_hides_key_value_passwords(password: str) -> None:
    """``password=...`` pairs (libpq DSNs, kwargs reprs) come out masked."""
    masked = errors.mask_secrets(f"host=db user=app password={password} dbname=app")
    # exactly: a containment check cannot tell a password of asterisks from the mask
    assert masked == "host=db user=app password=*** dbname=app"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(MySQLdb.OperationalError) (2006, 'Server has gone away')", "mysql-2006"),
        ("ERROR app: query failed: (2013, 'Lost connection to MySQL server')", "mysql-2013"),
        ("(2014, \"Commands out of sync; you can't run this command now\")", "mysql-2014"),
    ],
)
def test_codes_are_found_in_wrapped_messages_and_log_lines(text: str, expected: str) -> None:
    """A MySQL code inside SQLAlchemy's message or a log line is recognised, not only first."""
    kind = errors.classify(text)
    assert kind is not None
    assert kind.code == expected


def test_numbers_that_are_not_error_codes_are_ignored() -> None:
    """A four-digit number that is not a known code (a duration, a port) classifies nothing."""
    assert errors.classify("the query took (1234, 5) ms on port 3306") is None


# -- a code decides; the text only when there is none ------------------------------------------
def test_a_duplicate_key_whose_data_says_connection_refused_is_not_a_disconnect() -> None:
    """The error code decides: a 1062 whose *data* reads like a disconnect is no disconnect,
    raw, wrapped by SQLAlchemy, or as a log line."""
    raw = pymysql.err.IntegrityError(
        1062, "Duplicate entry 'Connection refused by upstream' for key 'note'")
    assert errors.classify(raw) is None
    wrapped = sa_exc.IntegrityError("INSERT INTO notes VALUES (%s)", ("x",), raw)
    assert errors.classify(wrapped) is None
    assert not errors.is_disconnect(wrapped)
    assert errors.classify(str(wrapped)) is None
    mysqlclient = MySQLdb.IntegrityError(1062, "Duplicate entry 'server has gone away' for key")
    assert errors.classify(mysqlclient) is None


@pytest.mark.parametrize("name", ["IntegrityError", "DataError", "ProgrammingError",
                                  "NotSupportedError"])
def test_a_statement_error_without_a_code_is_never_judged_by_its_text(name: str) -> None:
    """PEP 249's errors about the statement carry the application's words (a trigger's
    RAISE, a constraint's name): with no code, their text still names no disconnect, raw or
    wrapped by SQLAlchemy. An OperationalError or InterfaceError with the same text does."""
    text = "Connection refused: the account is locked"
    raw = type(name, (Exception,), {})(text)  # a driver's class of that name, no code
    assert errors.classify(raw) is None
    wrapped = getattr(sa_exc, name)("INSERT INTO accounts VALUES (?)", (1,), raw)
    assert errors.classify(wrapped) is None
    assert not errors.is_disconnect(wrapped)
    subclass = type("UniqueViolation", (type(raw),), {})(text)  # psycopg's subclasses
    assert errors.classify(subclass) is None
    for disconnect in ("OperationalError", "InterfaceError"):
        assert errors.classify(type(disconnect, (Exception,), {})(text)) is errors.CANT_CONNECT


def test_a_sqlite_error_is_judged_by_its_code_not_its_text() -> None:
    """sqlite3's errors carry SQLite's code (Python 3.11+): an OperationalError a user
    function raised with a disconnect's words is not one (SQLite has no server)."""
    import sqlite3

    conn = sqlite3.connect(":memory:")

    def fail() -> None:
        raise ValueError("MySQL server has gone away")

    conn.create_function("fail", 0, fail)
    with pytest.raises(sqlite3.OperationalError) as caught:
        conn.execute("SELECT fail()")
    conn.close()
    # SQLite words it "user-defined function raised exception", and codes it from 3.11
    assert "gone away" not in str(caught.value)
    if sys.version_info >= (3, 11):
        assert caught.value.sqlite_errorcode == 1  # SQLITE_ERROR
        assert errors.classify(caught.value) is None
    err = sqlite3.OperationalError("MySQL server has gone away")
    err.sqlite_errorcode = 1  # SQLITE_ERROR
    assert errors.classify(err) is None
    assert errors.classify(sqlite3.OperationalError("MySQL server has gone away")) is (
        errors.GONE_AWAY)  # no code (Python 3.10): the text decides


def test_postgres_error_with_a_sqlstate_is_judged_by_it() -> None:
    """A PostgreSQL error carrying a SQLSTATE that is not about the connection (a unique
    violation) is never classified by its message text; one without SQLSTATE still is."""
    import psycopg2.errors

    class UniqueViolation(psycopg2.errors.UniqueViolation):  # pgcode is read-only in C
        pgcode = "23505"

    err = UniqueViolation('duplicate key value violates unique constraint "u": Key (note)='
                          "(server closed the connection unexpectedly) already exists.")
    assert errors.classify(err) is None
    assert errors.classify(psycopg2.OperationalError(
        "server closed the connection unexpectedly")) is errors.PG_CLOSED


def test_an_error_raised_while_handling_a_disconnect_is_judged_on_its_own() -> None:
    """An IntegrityError raised inside ``except OperationalError:`` is not the disconnect
    (``__context__`` is not followed); an explicit ``raise ... from`` still is."""
    def handled() -> None:
        try:
            raise MySQLdb.OperationalError(2006, "MySQL server has gone away")
        except MySQLdb.OperationalError:
            raise MySQLdb.IntegrityError(1062, "Duplicate entry '1' for key 'PRIMARY'")  # noqa: B904

    def chained() -> None:
        try:
            raise MySQLdb.OperationalError(2006, "MySQL server has gone away")
        except MySQLdb.OperationalError as gone:
            raise RuntimeError("the job failed") from gone

    with pytest.raises(MySQLdb.IntegrityError) as integrity:
        handled()
    assert integrity.value.__context__ is not None
    assert errors.classify(integrity.value) is None
    with pytest.raises(RuntimeError) as runtime:
        chained()
    assert errors.classify(runtime.value) is errors.GONE_AWAY


# -- packet too large ---------------------------------------------------------------------------
def test_1153_is_packet_too_large_and_never_retried() -> None:
    """1153 "Got a packet bigger than 'max_allowed_packet' bytes" names packet size, is
    a dead connection, and is not safe to retry (it fails the same way every time)."""
    kind = errors.classify(MySQLdb.OperationalError(
        1153, "Got a packet bigger than 'max_allowed_packet' bytes"))
    assert kind is errors.PACKET_TOO_LARGE
    assert kind.disconnect
    assert not kind.retry_safe
    assert errors.classify("(1153, \"Got a packet bigger than 'max_allowed_packet' bytes\")") \
        is errors.PACKET_TOO_LARGE


def test_gone_away_on_an_oversized_statement_is_packet_too_large() -> None:
    """A 2006 on a statement at least as large as the server's max_allowed_packet is
    explained as packet size, with its fix; the same 2006 on a small statement is not."""
    orig = MySQLdb.OperationalError(2006, "Server has gone away")
    big = sa_exc.OperationalError("INSERT INTO blobs VALUES (%s)", (b"x" * 2_000_000,), orig)
    small = sa_exc.OperationalError("SELECT 1", (), orig)
    assert errors.classify(big, max_allowed_packet=1_048_576) is errors.PACKET_TOO_LARGE
    assert errors.classify(small, max_allowed_packet=1_048_576) is errors.GONE_AWAY
    assert errors.classify(orig, statement_size=2_000_000, max_allowed_packet=1_048_576) \
        is errors.PACKET_TOO_LARGE
    line = errors.explain(big, max_allowed_packet=1_048_576)
    assert line is not None
    assert "idle" not in line.split("Fix:")[0]
    assert "max_allowed_packet is 1,048,576 bytes" in line
    assert "about 2,000,029 bytes" in line
    assert "smaller pieces" in line
    assert "raise max_allowed_packet" in line


def test_the_learned_max_allowed_packet_is_used_and_the_smallest_kept() -> None:
    """`note_max_allowed_packet` (called where the idle limit is learned) is what classify
    compares with when the caller passes no limit; the smallest server's value is kept."""
    saved = errors._MAX_PACKET[0]
    try:
        errors._MAX_PACKET[0] = None
        orig = MySQLdb.OperationalError(2006, "Server has gone away")
        big = sa_exc.OperationalError("INSERT INTO t VALUES (%(b)s)", {"b": "é" * 600_000}, orig)
        assert errors.classify(big) is errors.GONE_AWAY  # nothing learned: cannot tell
        errors.note_max_allowed_packet(16_777_216)
        errors.note_max_allowed_packet("1048576")
        errors.note_max_allowed_packet(None)
        assert errors.learned_max_allowed_packet() == 1_048_576
        assert errors.classify(big) is errors.PACKET_TOO_LARGE
    finally:
        errors._MAX_PACKET[0] = saved


# -- SQLAlchemy 2.x's form of the fork symptom ---------------------------------------------------
def test_sqlalchemy_2_indexes_for_keys_not_implemented_is_the_fork_symptom() -> None:
    """SQLAlchemy 2.x raises a bare NotImplementedError from ``_indexes_for_keys`` when the
    ORM reads a reply without columns (another statement's): recognised by where it was
    raised; a NotImplementedError raised anywhere else is not."""
    from sqlalchemy import Column, Integer, MetaData, Table, create_engine, text

    table = Table("t", MetaData(), Column("id", Integer))
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        result = conn.execute(text("CREATE TABLE t (id INTEGER)"))  # a reply without columns
        with pytest.raises(NotImplementedError) as caught:
            result._metadata._row_as_tuple_getter([table.c.id])
    kind = errors.classify(caught.value)
    assert kind is errors.NO_RESULT_METADATA
    assert not kind.retry_safe
    assert not kind.disconnect
    with pytest.raises(NotImplementedError) as elsewhere:
        raise NotImplementedError
    assert errors.classify(elsewhere.value) is None


# -- the API and its noise ----------------------------------------------------------------------
def test_explain_returns_the_line_and_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """``explain`` returns a str (or None) and prints nothing, as the README says."""
    line = errors.explain(MySQLdb.OperationalError(2013, "Lost connection"))
    assert isinstance(line, str)
    assert errors.explain(ValueError("x")) is None
    assert capsys.readouterr() == ("", "")


def test_repeated_reports_are_one_debug_line_and_no_doubled_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first report of a cause is the explanation (once); later ones are one short
    DEBUG line; no message starts with 'forksafe:' (the logger's name already says it)."""
    errors.reset_reported()
    caplog.set_level(logging.DEBUG, logger="forksafe")
    for _ in range(3):
        errors.report(MySQLdb.OperationalError(2006, "gone away"), "Engine(x)")
    records = [r for r in caplog.records if r.name == "forksafe"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "Likely cause" in records[0].getMessage()
    assert all(len(r.getMessage()) < 120 for r in records[1:]), records
    assert not any(r.getMessage().startswith("forksafe:") for r in records)
    errors.reset_reported()


def test_django_projects_get_django_advice() -> None:
    """In a Django project the fix names forksafe.django, not forksafe.track(engine)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=sys.argv[1:])\n"
        "import MySQLdb\n"
        "from forksafe import errors\n"
        "print(errors.explain(MySQLdb.OperationalError(2006, 'gone away')))\n"
        "print(errors.explain(MySQLdb.OperationalError(2014, 'out of sync')))\n"
    )

    def run(*apps: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", code, *apps], capture_output=True,
                              text=True, check=True, timeout=120).stdout.splitlines()

    out = [run()[0], run("forksafe.django")[1]]
    assert len(out) == 2, out
    assert "forksafe.track" not in out[0], out
    assert "forksafe.track" not in out[1], out
    assert "add 'forksafe.django' to INSTALLED_APPS" in out[0]
    assert "unit_of_work" in out[0]
    assert "INSTALLED_APPS every worker opens its own" in out[1]
    assert "add 'forksafe.django'" not in out[1]
    plain = errors.explain(MySQLdb.OperationalError(2006, "gone away"))
    assert plain is not None
    assert "forksafe.track(engine)" in plain


def test_retries_log_one_short_line_each_and_never_repeat_a_packet_too_large(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disconnect retried twice: the explanation once (WARNING), then one short INFO line
    per retry. A statement over max_allowed_packet runs once: it would fail every time."""
    import forksafe

    errors.reset_reported()
    caplog.set_level(logging.INFO, logger="forksafe")
    calls = []

    @forksafe.retry_on_disconnect(attempts=3, backoff=0.0)
    def flaky() -> None:
        calls.append(1)
        raise MySQLdb.OperationalError(2013, "Lost connection to MySQL server during query")

    with pytest.raises(MySQLdb.OperationalError):
        flaky()
    assert len(calls) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "forksafe"]
    assert sum("Likely cause" in line for line in lines) == 1, lines
    retries = [line for line in lines if "retrying in" in line]
    assert len(retries) == 2, lines
    assert all(len(line) < 120 and not line.startswith("forksafe:") for line in retries), lines

    calls.clear()
    orig = MySQLdb.OperationalError(2006, "Server has gone away")

    @forksafe.retry_on_disconnect(attempts=5, backoff=0.0)
    def insert_blob() -> None:
        calls.append(1)
        raise sa_exc.OperationalError("INSERT INTO blobs VALUES (%s)", (b"x" * 2_000_000,), orig)

    saved = errors._MAX_PACKET[0]
    errors._MAX_PACKET[0] = 1_048_576
    try:
        with pytest.raises(sa_exc.OperationalError):
            insert_blob()
    finally:
        errors._MAX_PACKET[0] = saved
    assert len(calls) == 1
    errors.reset_reported()


def test_the_readme_says_explain_returns_the_line() -> None:
    """The README describes explain() as the API behaves: it returns the line (or None)."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "explain(exc)` prints" not in readme
    assert "`forksafe.errors.explain(exc)` *returns*" in readme


def test_no_log_line_repeats_the_loggers_name() -> None:
    """Records of the ``forksafe`` logger never start with 'forksafe:' (a default handler
    already prints 'WARNING:forksafe:', so the line would read 'WARNING:forksafe:forksafe:')."""
    import ast
    from pathlib import Path

    package = Path(errors.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "logger"
                    and node.func.attr in ("info", "warning", "error", "critical", "exception",
                                           "log") and node.args):
                continue
            first = node.args[1] if node.func.attr == "log" and len(node.args) > 1 else \
                node.args[0]
            text = ""
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
            elif isinstance(first, ast.JoinedStr) and first.values and isinstance(
                    first.values[0], ast.Constant):
                text = str(first.values[0].value)
            if text.startswith("forksafe:"):
                offenders.append(f"{path.name}:{node.lineno}: {text[:40]!r}")
    assert offenders == [], offenders
