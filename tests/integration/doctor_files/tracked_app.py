"""The same app with its engine tracked."""
import os

from sqlalchemy import create_engine, text

import forksafe

engine = forksafe.track(create_engine(os.environ["DATABASE_URL"]))
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))
