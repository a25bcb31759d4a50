"""Alembic environment: run with the connection `KeyStore.migrate` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from gateway.governance.store import Base

connection = context.config.attributes["connection"]
if connection.dialect.name == "postgresql":
    # Several gateway processes may start at once: one migrates, the others wait for it.
    connection.execute(text("SELECT pg_advisory_xact_lock(7244551)"))
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
