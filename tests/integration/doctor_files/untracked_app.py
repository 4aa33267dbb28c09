"""An app that opens an untracked engine's connection at import (the dangerous case)."""
import os

from sqlalchemy import create_engine, text

engine = create_engine(os.environ["DATABASE_URL"])
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))
