"""An untracked engine with pool_size=2, max_overflow=0 that runs a query at import."""
import os

from sqlalchemy import create_engine, text

engine = create_engine(os.environ["DATABASE_URL"], pool_size=2, max_overflow=0)
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))
