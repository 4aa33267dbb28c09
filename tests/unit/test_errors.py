"""Unit tests of forksafe.errors: classifying, explaining and logging disconnect errors."""

from __future__ import annotations

import logging

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
    assert f"{user}:***@db.example" in masked
    assert f":{password}@" not in masked


@given(password=_PASSWORDS.filter(lambda p: ":" not in p and "=" not in p))
def test_mask_secrets_hides_key_value_passwords(password: str) -> None:
    """``password=...`` pairs (libpq DSNs, kwargs reprs) come out masked."""
    masked = errors.mask_secrets(f"host=db user=app password={password} dbname=app")
    assert "password=***" in masked
    assert "dbname=app" in masked
    assert f"password={password}" not in masked


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
