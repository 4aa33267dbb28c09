"""Test and reproduction tooling: private database servers, real workers, load, reports.

Used by forksafe's own test suite and by ``forksafe repro``; importing it needs the
``repro`` extra (``pip install 'forksafe[repro]'``).
"""
