"""A Django project with two MySQL aliases (CONN_MAX_AGE = 60) and no forksafe.django."""
import os

import django
from django.conf import settings

_db = {
    "ENGINE": "django.db.backends.mysql",
    "HOST": "127.0.0.1",
    "PORT": os.environ["DB_PORT"],
    "USER": "root",
    "NAME": "forksafe",
    "CONN_MAX_AGE": 60,
}
settings.configure(DATABASES={"default": _db, "replica": dict(_db)}, INSTALLED_APPS=[])
django.setup()
