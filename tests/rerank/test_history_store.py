"""History store: migrations up and down, the revision check, URL handling, SQL error mapping (SQLite + PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import exc, inspect, text

from indexing.errors import ConfigError, HistoryError, NotMigratedError
from rerank.history.models import VERSION_TABLE, Base
from rerank.history.store import (
    HistoryStore,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    normalize_url,
    upgrade,
)
from tests.rerank import history_support

# the shared fixtures (each test runs on SQLite and on PostgreSQL)
db_url = history_support.db_url
store = history_support.store

TS = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)


def _row(event_id: str, user: str = "u1", product: str = "p1", etype: str = "view") -> dict:
    return {"event_id": event_id, "user_id": user, "product_id": product, "type": etype, "ts": TS}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = make_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_migrations_up_and_down_keep_data(db_url: str) -> None:
    assert current_revision(db_url) is None
    assert upgrade(db_url) == head_revision() == "0004"
    assert {"ubi_queries", "ubi_shown", "ubi_events"} <= _tables(db_url)
    assert {"users", "events", VERSION_TABLE} <= _tables(db_url)
    assert "ingested_at" in _columns(db_url, "events")
    with HistoryStore(db_url) as s:
        assert s.insert_events([_row("e1"), _row("e2", product="p2", etype="purchase")]) == ["e1", "e2"]

    # 0002 -> 0001: on SQLite this recreates the events table (batch mode); the rows survive it
    assert downgrade(db_url, "0001") == "0001"
    assert "ingested_at" not in _columns(db_url, "events")
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT event_id, type FROM events ORDER BY event_id")).all() == [("e1", "view"), ("e2", "purchase")]
    engine.dispose()

    assert upgrade(db_url) == "0004"  # and up again (batch mode on SQLite once more)
    with HistoryStore(db_url) as s:
        assert s.count_events() == 2
        assert s.recent_events("u1", 10)[0][0] in {"p1", "p2"}

    assert downgrade(db_url, "base") is None
    assert not {"users", "events"} & _tables(db_url)


def test_migrated_schema_matches_the_models(store: HistoryStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        diffs = compare_metadata(ctx, Base.metadata)
    assert diffs == []


def test_check_constraint_rejects_unknown_event_type(store: HistoryStore) -> None:
    with pytest.raises(exc.IntegrityError):
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO users (user_id) VALUES ('u1')"))
            conn.execute(
                text("INSERT INTO events (event_id, user_id, product_id, type, ts) VALUES ('x', 'u1', 'p1', 'like', :ts)"),
                {"ts": TS if store.dialect == "postgresql" else TS.replace(tzinfo=None)},
            )
    # the store maps the same failure onto HistoryError, naming the database and the cause
    with pytest.raises(HistoryError, match="storing 1 events failed") as info:
        store.insert_events([_row("e9", etype="like")])
    assert "ck_events_type" in str(info.value) or "CHECK" in str(info.value)


def test_insert_is_idempotent_on_event_id(store: HistoryStore) -> None:
    assert store.insert_events([_row("a"), _row("b")]) == ["a", "b"]
    assert store.insert_events([_row("b"), _row("c")]) == ["c"]
    assert store.count_events() == 3
    assert store.count_users() == 1


def test_timestamps_round_trip_as_utc(store: HistoryStore) -> None:
    from datetime import timedelta

    local = TS.astimezone(timezone(timedelta(hours=5, minutes=30)))
    store.insert_events([_row("a", product="p1") | {"ts": local}, _row("b", product="p2") | {"ts": TS + timedelta(seconds=1.5)}])
    rows = store.recent_events("u1", 10)
    assert [(p, t) for p, t, _ in rows] == [("p2", "view"), ("p1", "view")]  # newest first
    assert rows[1][2] == TS.timestamp()
    assert rows[0][2] == pytest.approx(TS.timestamp() + 1.5)
    with pytest.raises(HistoryError, match="naive datetime"):
        store.insert_events([_row("c") | {"ts": TS.replace(tzinfo=None)}])


def test_store_refuses_an_unmigrated_database(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        with pytest.raises(NotMigratedError, match="fusionrank db upgrade"):
            HistoryStore(db_url)
        path = db_url.removeprefix("sqlite:///")
        assert not __import__("os").path.exists(path), "opening must not create an empty database file"
        make_engine(db_url).connect().close()  # an empty database file
    with pytest.raises(NotMigratedError, match=r"not migrated.*fusionrank db upgrade"):
        HistoryStore(db_url)


def test_store_refuses_a_database_behind_or_ahead(db_url: str) -> None:
    upgrade(db_url, "0001")
    with pytest.raises(NotMigratedError, match=r"'0001', behind.*'0004'.*fusionrank db upgrade"):
        HistoryStore(db_url)
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(NotMigratedError, match="newer version"):
        HistoryStore(db_url)


def test_dropped_tables_are_reported_as_not_migrated(store: HistoryStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE events"))
    with pytest.raises(NotMigratedError, match="fusionrank db upgrade"):
        store.recent_events("u1", 5)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    upgrade(url)
    with HistoryStore(url) as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_urls_are_normalised_to_psycopg_and_others_refused() -> None:
    assert normalize_url("postgresql://u:pw@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(ConfigError, match="psycopg"):
        normalize_url("postgresql+psycopg2://h/db")
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        normalize_url("mysql://h/db")
    with pytest.raises(ConfigError, match="invalid SQL URL"):
        normalize_url("not a url")


@pytest.mark.integration
def test_unreachable_postgres_is_a_history_error_with_the_password_redacted() -> None:
    with pytest.raises(HistoryError, match="unreachable") as info:
        HistoryStore("postgresql://fr:s3cret@127.0.0.1:9/test")
    assert not isinstance(info.value, NotMigratedError)
    assert "s3cret" not in str(info.value) and "127.0.0.1" in str(info.value)
    with pytest.raises(HistoryError, match="unreachable"):
        upgrade("postgresql://fr:s3cret@127.0.0.1:9/test")


def test_a_bad_target_revision_is_a_history_error(db_url: str) -> None:
    with pytest.raises(HistoryError, match="cannot upgrade"):
        upgrade(db_url, "nonexistent")
