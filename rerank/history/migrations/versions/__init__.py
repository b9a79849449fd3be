"""Alembic revision scripts of the user-history store."""
