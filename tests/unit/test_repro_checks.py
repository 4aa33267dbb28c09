"""Pure logic of forksafe repro: expected answers, answer validation, error naming, HTTP outcomes.

Exceptions here are the real classes the drivers and SQLAlchemy raise, built with the codes
and messages they carry (no database needed to name one).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forksafe.testing import checks
from forksafe.testing.load import classify_http


def test_expected_answer_is_the_echo_and_three_seeded_rows() -> None:
    """Request n expects its own number back and three consecutive seeded rows."""
    answer = checks.expected_answer(5)
    assert answer["echo"] == 5
    assert [r[0] for r in answer["rows"]] == [6, 7, 8]
    assert answer["rows"][0][1] == checks.label_for(6)


@given(st.integers(min_value=0, max_value=10**9))
def test_requested_range_stays_inside_the_seeded_table(n: int) -> None:
    """Every request number maps to ids that exist in the seeded table."""
    a = checks.first_id_for(n)
    assert a >= 1
    assert a + checks.ROWS_PER_REQUEST - 1 <= checks.SEED_ROWS


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_another_requests_answer_is_wrong(n: int, m: int) -> None:
    """A body that answers request m is OK for n only when m == n."""
    body = json.loads(json.dumps(checks.expected_answer(m)))  # as it comes over HTTP
    assert checks.validate_answer(n, body) == (checks.OK if n == m else checks.WRONG)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"echo": 7},
        {"echo": "7", "rows": checks.expected_answer(7)["rows"]},
        {"echo": True, "rows": checks.expected_answer(1)["rows"]},
        {"echo": 7, "rows": checks.expected_answer(7)["rows"][:2]},
        {"echo": 7, "rows": list(reversed(checks.expected_answer(7)["rows"]))},
        {"echo": 7, "rows": [[r[0], r[1] + "x"] for r in checks.expected_answer(7)["rows"]]},
    ],
)
def test_anything_but_the_exact_answer_is_wrong(body: object) -> None:
    """Missing keys, wrong types, missing, reordered or altered rows are wrong answers."""
    assert checks.validate_answer(7, body) == checks.WRONG


def test_extra_keys_such_as_the_pid_are_ignored() -> None:
    """The app adds its pid to an answer; that does not make it wrong."""
    body = {**checks.expected_answer(9), "pid": 1234}
    assert checks.validate_answer(9, body) == checks.OK


def _wrapped(orig: Exception) -> Exception:
    from sqlalchemy.exc import DBAPIError

    return DBAPIError.instance("SELECT 1", {}, orig, type(orig))


def test_mysqlclient_codes_name_the_error() -> None:
    """mysqlclient's 2006, 2013 and 2014, raw or wrapped by SQLAlchemy, keep their names."""
    import MySQLdb

    cases = {
        2006: checks.GONE,
        2013: checks.LOST,
        2014: checks.SYNC,
    }
    for code, category in cases.items():
        raw = MySQLdb.OperationalError(code, "message")
        assert checks.classify_exception(raw) == category
        assert checks.classify_exception(_wrapped(raw)) == category
    other = MySQLdb.OperationalError(1045, "Access denied")
    assert checks.classify_exception(other) == checks.OTHER


def test_sqlalchemy_result_errors_are_named() -> None:
    """ResourceClosedError and NoSuchColumnError (and a plain missing key) have their own names."""
    from sqlalchemy.exc import NoSuchColumnError, ResourceClosedError

    assert checks.classify_exception(ResourceClosedError("closed")) == checks.CLOSED
    assert checks.classify_exception(NoSuchColumnError("echo")) == checks.COLUMN
    assert checks.classify_exception(KeyError("echo")) == checks.COLUMN


def test_resource_closed_wins_over_the_error_that_caused_it() -> None:
    """What the application sees (ResourceClosedError) is named, even if a 2013 caused it."""
    import MySQLdb
    from sqlalchemy.exc import ResourceClosedError

    closed = ResourceClosedError("This result object does not return rows.")
    closed.__cause__ = _wrapped(MySQLdb.OperationalError(2013, "Lost connection"))
    assert checks.classify_exception(closed) == checks.CLOSED


def test_pymysql_and_psycopg2_messages_are_named() -> None:
    """Drivers without MySQL codes are named by their messages."""
    import psycopg2
    import pymysql

    sequence = pymysql.err.InternalError("Packet sequence number wrong - got 3 expected 1")
    assert checks.classify_exception(sequence) == checks.SYNC
    lost = pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
    assert checks.classify_exception(lost) == checks.LOST
    closed = psycopg2.OperationalError("server closed the connection unexpectedly")
    assert checks.classify_exception(_wrapped(closed)) == checks.LOST
    gone = psycopg2.InterfaceError("connection already closed")
    assert checks.classify_exception(gone) == checks.GONE


@given(st.text(max_size=80), st.one_of(st.none(), st.integers(), st.text(max_size=10)))
def test_any_exception_gets_a_known_name(message: str, first: object) -> None:
    """classify_exception never fails and always answers one of the error categories."""
    exc = RuntimeError(first, message) if first is not None else RuntimeError(message)
    assert checks.classify_exception(exc) in checks.ERROR_CATEGORIES


def test_tally_counts_every_category_and_folds_unknown_ones_into_other() -> None:
    """tally has every category (zeros too); an unknown outcome counts as another error."""
    counts = checks.tally([checks.OK, checks.OK, checks.WRONG, "surprise"])
    assert set(counts) == set(checks.CATEGORIES)
    assert counts[checks.OK] == 2
    assert counts[checks.WRONG] == 1
    assert counts[checks.OTHER] == 1
    assert checks.problems(counts) == 2


def test_http_outcomes() -> None:
    """200 is checked against the request, 500 carries the app's category, 502 a lost worker."""
    right = json.dumps(checks.expected_answer(3)).encode()
    assert classify_http(3, 200, right) == (checks.OK, "")
    category, message = classify_http(4, 200, right)
    assert category == checks.WRONG
    assert "asked for 4" in message
    error = json.dumps({"error": checks.SYNC, "message": "Commands out of sync"}).encode()
    assert classify_http(3, 500, error) == (checks.SYNC, "Commands out of sync")
    assert classify_http(3, 500, b'{"error": "bogus"}')[0] == checks.OTHER
    assert classify_http(3, 500, b"<html>Internal Server Error</html>")[0] == checks.OTHER
    assert classify_http(3, 502, b"Bad Gateway")[0] == checks.HUNG
    assert classify_http(3, 200, b"not json")[0] == checks.WRONG


def test_sqlalchemy_2_indexes_for_keys_symptom_is_the_column_column() -> None:
    """SQLAlchemy 2.x's bare NotImplementedError from ``_indexes_for_keys`` (where 1.x raised
    NoSuchColumnError) counts in the 'column' column, not as 'other'; a NotImplementedError
    raised elsewhere stays 'other'."""
    from sqlalchemy import Column, Integer, MetaData, Table, create_engine, text

    table = Table("t", MetaData(), Column("id", Integer))
    with create_engine("sqlite://").connect() as conn:
        result = conn.execute(text("CREATE TABLE t (id INTEGER)"))  # a reply without columns
        with pytest.raises(NotImplementedError) as caught:
            result._metadata._row_as_tuple_getter([table.c.id])
    assert checks.classify_exception(caught.value) == checks.COLUMN
    assert checks.classify_exception(NotImplementedError()) == checks.OTHER


def test_runs_with_forksafe_are_not_judged_on_speed() -> None:
    """A request of a run with forksafe counts as hung only after at least 60 s, and its
    driver timeout is generous too: a slow, busy machine must not turn a clean run into a
    failed one. Runs without forksafe keep the short bounds (stuck requests are expected)."""
    from forksafe.testing import repro

    assert repro._request_timeout(5.0, protect=True) >= 60
    assert repro._db_timeout(5.0, protect=True) >= 30
    assert repro._request_timeout(5.0, protect=False) == 5.0
    assert repro._db_timeout(5.0, protect=False) == 3
    assert repro._request_timeout(120.0, protect=True) == 120.0
