# ruff: noqa: PT009 - Django test cases (unittest), run by Django's runner, not pytest
"""Test cases that record which database and session each worker's tests run on.

E has ``serialized_rollback = True``: Django then serialises the test database after
cloning it, so the parent holds an open connection (with the pool: an open pool) when it
forks its workers.
"""

import os

from django.db import connection
from django.test import TestCase, TransactionTestCase

from probe.models import Item
from probe.runner import database_of, report, session_of


class Writes:
    def observe(self):
        """Record, then check, the database and session this test runs on."""
        connection.ensure_connection()
        raw = connection.connection
        record = {"role": "test", "test": self.id(), "pid": os.getpid(),
                  "settings_name": connection.settings_dict["NAME"],
                  "client_name": database_of(raw), "session": session_of(raw)}
        report(record)  # before any query: what the worker was handed
        with connection.cursor() as cur:
            if connection.vendor == "postgresql":
                cur.execute("SELECT current_database(), pg_backend_pid()")
            else:
                cur.execute("SELECT DATABASE(), CONNECTION_ID()")
            name, session = cur.fetchone()
        self.assertEqual((name, session), (record["settings_name"], record["session"]))

    def test_rows(self):
        self.observe()
        for n in range(20):
            Item.objects.create(worker=os.getpid(), n=n)
        self.assertEqual(Item.objects.count(), 20)
        self.assertEqual(set(Item.objects.values_list("worker", flat=True)), {os.getpid()})
        self.observe()


class A(Writes, TestCase):
    pass


class B(Writes, TestCase):
    pass


class C(Writes, TransactionTestCase):
    pass


class D(Writes, TransactionTestCase):
    pass


class E(Writes, TransactionTestCase):
    serialized_rollback = True
