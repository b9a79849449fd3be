"""Alembic migrations of the user-history store (run through :mod:`rerank.history.store`, never a .ini file)."""
