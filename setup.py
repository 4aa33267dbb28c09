"""Only the C part of the build; everything else is in pyproject.toml.

``forksafe._speedups`` holds the tracked pool's checkout methods in C. It is optional: where
it cannot be built (no compiler, no Python headers), the install goes on with a warning and
forksafe uses the same methods in Python (``forksafe/sqlalchemy.py``).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("forksafe._speedups", ["forksafe/_speedups.c"], optional=True)])
