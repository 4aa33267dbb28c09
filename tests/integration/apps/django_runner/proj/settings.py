"""Settings of the project whose ``manage.py test --parallel 2`` the tests run.

From the environment: RUNNER_DB ``postgresql`` or ``mysql``; RUNNER_POOL ``1`` turns on
Django's PostgreSQL pool (``OPTIONS["pool"]``); RUNNER_PORT of the private server;
RUNNER_TEST_NAME, the test database (workers get ``<name>_1`` and ``<name>_2``);
RUNNER_IDLE_TIMEOUT (milliseconds) sets PostgreSQL's idle session timeouts;
RUNNER_FORKSAFE ``1`` puts ``"forksafe.django"`` in INSTALLED_APPS; RUNNER_REPORT, the file
the runner and the test cases append JSON lines to.
"""

import os

SECRET_KEY = "test-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = ["probe"]
if os.environ.get("RUNNER_FORKSAFE") == "1":
    INSTALLED_APPS.append("forksafe.django")
TEST_RUNNER = "probe.runner.Runner"

_test = {"NAME": os.environ["RUNNER_TEST_NAME"]}
if os.environ["RUNNER_DB"] == "postgresql":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql", "HOST": "127.0.0.1",
        "PORT": os.environ["RUNNER_PORT"], "USER": "postgres", "NAME": "forksafe",
        "TEST": _test,
    }}
    options = {}
    if os.environ.get("RUNNER_POOL") == "1":
        options["pool"] = {"min_size": 2, "max_size": 4, "timeout": 10}
    if os.environ.get("RUNNER_IDLE_TIMEOUT"):  # ends a session a hung client waits on
        ms = int(os.environ["RUNNER_IDLE_TIMEOUT"])
        options["options"] = (
            f"-c idle_in_transaction_session_timeout={ms} -c idle_session_timeout={ms}"
        )
    DATABASES["default"]["OPTIONS"] = options
else:
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1",
        "PORT": os.environ["RUNNER_PORT"], "USER": "root", "PASSWORD": "", "NAME": "forksafe",
        "TEST": _test,
    }}
