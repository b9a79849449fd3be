"""Alembic environment of the history store.

It is driven in code by :func:`rerank.history.store.upgrade` / :func:`~rerank.history.store.downgrade`,
which open the connection themselves (with the URL, schema and SQLite settings the store uses) and
hand it over in ``config.attributes["connection"]``. There is no ``alembic.ini``.
"""

from __future__ import annotations

from alembic import context

from rerank.history.models import VERSION_TABLE, Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable when someone runs the alembic CLI by hand
    raise RuntimeError("run the history migrations with `fusionrank db upgrade` (rerank.history.store.upgrade)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things: batch mode recreates the table (copy + rename) when needed.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)

with context.begin_transaction():
    context.run_migrations()
