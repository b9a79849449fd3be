"""Shared fixtures of the history-store tests: the same tests run on SQLite and on the real PostgreSQL.

PostgreSQL isolation: each test gets a schema of its own (``CREATE SCHEMA``; the URL sets the
connections' ``search_path`` to it, so the tables and Alembic's version table live there) that is
dropped afterwards. Import the fixtures into a test module with
``from tests.rerank.history_support import db_url, store  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import text

from rerank.history.store import HistoryStore, make_engine, upgrade, with_search_path

DEV_EVENTS = Path("fashion/bench/dev/events.csv")
DEV_EVENTS_ROWS = 25_685


@contextlib.contextmanager
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema; yields a URL whose connections use it, drops it afterwards."""
    schema = f"fr_test_{uuid.uuid4().hex[:12]}"
    engine = make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        yield with_search_path(postgres_url, schema)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (not migrated): a SQLite file, or a fresh schema in the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'history.sqlite3'}"
    else:
        with pg_schema(request.getfixturevalue("postgres_url")) as url:
            yield url


@pytest.fixture
def store(db_url: str) -> Iterator[HistoryStore]:
    """An open store on a migrated database."""
    upgrade(db_url)
    with HistoryStore(db_url) as s:
        yield s


def import_in_process(url: str, path: str, batch_size: int, barrier, results) -> None:  # noqa: ANN001
    """Body of one concurrent importer process (spawned): wait for the other, import, report the summary."""
    from rerank.history.ingest import import_events_file

    with HistoryStore(url) as s:
        barrier.wait(timeout=60)
        summary = import_events_file(s, path, batch_size=batch_size, progress=False)
    results.put((path, summary.stored, summary.duplicates, summary.rejected))
