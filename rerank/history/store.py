"""The SQL side of the user-history store: URLs, engines, migrations and the few queries profiles need.

Library code takes the SQL URL as an argument (the CLI decides the default: a SQLite file in the data
dir). Supported: ``sqlite:///path`` (embedded default; WAL mode, busy timeout, foreign keys on) and
PostgreSQL through psycopg 3 (``postgresql+psycopg://...``; ``postgresql://`` and ``postgres://`` are
mapped to psycopg).

:class:`HistoryStore` refuses to open a database whose Alembic revision is not this version's head
(:class:`~indexing.errors.NotMigratedError`, telling to run ``fusionrank db upgrade``). SQLAlchemy
errors are mapped onto :class:`~indexing.errors.HistoryError` with a message naming the database
(password redacted) and the cause.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from sqlalchemy import Connection, Engine, bindparam, create_engine, event, exc, func, select
from sqlalchemy.engine import URL, make_url

from indexing.errors import ConfigError, HistoryError, NotMigratedError
from rerank.history.models import VERSION_TABLE, Event, User

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: SQLite: how long a writer waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: WAL pages between automatic checkpoints (SQLite's default: 1000 pages, ~4 MiB)
SQLITE_WAL_AUTOCHECKPOINT_PAGES = 10_000
#: Attempts for a write transaction that hit a transient conflict (deadlock, serialization, busy).
WRITE_ATTEMPTS = 5
_T = TypeVar("_T")

_UPGRADE_HINT = "run `fusionrank db upgrade` (or pass the same --sql-url to it)"


# --------------------------------------------------------------------------- URLs
def normalize_url(url: str | URL) -> URL:
    """Parse a SQL URL; ``postgresql://`` / ``postgres://`` become ``postgresql+psycopg://``.

    Raises :class:`ConfigError` for anything but SQLite and PostgreSQL (psycopg 3).
    """
    try:
        u = make_url(url) if isinstance(url, str) else url
    except exc.ArgumentError as e:
        raise ConfigError(f"invalid SQL URL {redact(str(url))!r}: {e}") from None
    backend, _, driver = u.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise ConfigError(f"SQL URL driver {u.drivername!r} is not supported; use postgresql+psycopg:// (psycopg 3)")
        return u.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ConfigError(f"SQL URL driver {u.drivername!r} is not supported; use sqlite:///path")
        return u
    raise ConfigError(f"unsupported database {u.drivername!r} in SQL URL; supported: sqlite:///path, postgresql+psycopg://...")


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<invalid URL>"


def with_search_path(url: str | URL, schema: str) -> str:
    """A PostgreSQL URL whose connections use ``schema`` (tables and Alembic's version table live there).

    Used to isolate tests and benchmarks in a schema of their own; the schema must exist.
    """
    u = normalize_url(url)
    if u.get_backend_name() != "postgresql":
        raise ConfigError("a search_path only applies to PostgreSQL URLs")
    if not schema.replace("_", "").isalnum():
        raise ConfigError(f"schema name {schema!r} must be letters, digits and '_'")
    return u.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def _sqlite_path(u: URL) -> Path | None:
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """A SQLAlchemy engine set up for the history store (SQLite pragmas, psycopg connect timeout)."""
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(u, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        is_file = _sqlite_path(u) is not None

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if is_file:
                # WAL: readers never block the writer and the writer never blocks readers.
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                # checkpoint the WAL into the database every ~40 MiB instead of SQLite's 4 MiB: a bulk import's batches
                # rewrite the same index pages, and each checkpoint copies them again (-20 % bytes written by a UBI import)
                cur.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA cache_size=-32768")  # 32 MiB of page cache per connection
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # pre-ping: a pooled connection cut by a database restart is noticed and replaced at checkout, so the
    # store recovers by itself when PostgreSQL comes back (tested by `fusionrank drill`'s postgres_down)
    return create_engine(u, echo=echo, connect_args={"connect_timeout": 10}, pool_size=5, max_overflow=10, pool_pre_ping=True)


# --------------------------------------------------------------------------- errors
def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _is_missing_table(e: exc.DBAPIError) -> bool:
    msg = str(e.orig).lower()
    return "no such table" in msg or ("relation" in msg and "does not exist" in msg)


@contextlib.contextmanager
def sql_errors(what: str, url: str | URL) -> Iterator[None]:
    """Map SQLAlchemy errors raised inside the block onto :class:`HistoryError` / :class:`NotMigratedError`."""
    try:
        yield
    except HistoryError:
        raise
    except exc.DBAPIError as e:
        if _is_missing_table(e):
            raise NotMigratedError(
                f"{what}: the history tables are missing in {redact(url)} ({_first_line(e)}); {_UPGRADE_HINT}"
            ) from e
        if isinstance(e, exc.OperationalError):
            raise HistoryError(f"{what}: database {redact(url)} is unreachable or unusable: {_first_line(e)}") from e
        raise HistoryError(f"{what} failed on {redact(url)}: {_first_line(e)}") from e
    except exc.SQLAlchemyError as e:
        raise HistoryError(f"{what} failed on {redact(url)}: {_first_line(e)}") from e


def _is_transient(e: exc.DBAPIError) -> bool:
    """Deadlock / serialization failure (PostgreSQL) or a lock held past the busy timeout (SQLite)."""
    code = getattr(e.orig, "sqlstate", None)
    if code in ("40P01", "40001"):
        return True
    return "database is locked" in str(e.orig)


# --------------------------------------------------------------------------- migrations
def _alembic_config(conn: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


@lru_cache(maxsize=1)
def _script_directory() -> Any:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg)


def head_revision() -> str:
    """The newest migration this version ships (the revision a usable database must be at)."""
    head = _script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise HistoryError(f"no history migrations found in {MIGRATIONS_DIR}")
    return head


def _current(conn: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def current_revision(url: str | URL) -> str | None:
    """The database's Alembic revision, ``None`` when it has never been migrated."""
    u = normalize_url(url)
    path = _sqlite_path(u) if u.get_backend_name() == "sqlite" else None
    if path is not None and not path.exists():
        return None
    engine = make_engine(u)
    try:
        with sql_errors("reading the schema revision", u), engine.connect() as conn:
            return _current(conn)
    finally:
        engine.dispose()


def _migrate(url: str | URL, revision: str, direction: str) -> str | None:
    from alembic import command
    from alembic.util import CommandError

    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        path = _sqlite_path(u)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(u)
    try:
        with sql_errors(f"migrating ({direction} to {revision})", u), engine.begin() as conn:
            cfg = _alembic_config(conn)
            try:
                if direction == "upgrade":
                    command.upgrade(cfg, revision)
                else:
                    command.downgrade(cfg, revision)
            except CommandError as e:
                raise HistoryError(f"cannot {direction} {redact(u)} to {revision!r}: {e}") from e
            rev = _current(conn)
        log.info("history database %s: %s to %s", redact(u), direction, rev)
        return rev
    finally:
        engine.dispose()


def upgrade(url: str | URL, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision`` (default: head); returns the revision the database is at."""
    return _migrate(url, revision, "upgrade")


def downgrade(url: str | URL, revision: str = "-1") -> str | None:
    """Revert migrations down to ``revision`` (``-1``: one step, ``base``: everything)."""
    return _migrate(url, revision, "downgrade")


# --------------------------------------------------------------------------- store
def to_epoch(ts: datetime) -> float:
    return ts.timestamp() if ts.tzinfo else ts.replace(tzinfo=timezone.utc).timestamp()


def _aware_utc(ts: datetime, event_id: str) -> datetime:
    if not isinstance(ts, datetime) or ts.tzinfo is None:
        raise HistoryError(f"event {event_id!r}: ts must be a timezone-aware datetime (naive datetime {ts!r} is ambiguous)")
    return ts.astimezone(timezone.utc)


class HistoryStore:
    """An open, migrated history database: batched idempotent inserts and "last K events of a user".

    ``HistoryStore(url)`` checks the schema revision and raises :class:`NotMigratedError` when the
    database is un-migrated, behind, or ahead of this version. Thread-safe (a connection pool); open
    one per process (after a fork, open a new one).
    """

    def __init__(self, url: str | URL, *, echo: bool = False):
        self.url = normalize_url(url)
        self.url_text = redact(self.url)
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite":
            path = _sqlite_path(self.url)
            if path is not None and not path.exists():
                raise NotMigratedError(f"no history database at {path}; {_UPGRADE_HINT}")
        self.engine = make_engine(self.url, echo=echo)
        try:
            self._check_revision()
        except BaseException:
            self.engine.dispose()
            raise
        self._recent = (
            select(Event.product_id, Event.type, Event.ts)
            .where(Event.user_id == bindparam("uid"))
            .order_by(Event.ts.desc())
            .limit(bindparam("n"))
        )

    # -- setup
    def _check_revision(self) -> None:
        with sql_errors("opening the history store", self.url), self.engine.connect() as conn:
            rev = _current(conn)
        head = head_revision()
        if rev is None:
            raise NotMigratedError(f"history database {self.url_text} is not migrated (no schema revision); {_UPGRADE_HINT}")
        if rev != head:
            known = {s.revision for s in _script_directory().walk_revisions()}
            if rev not in known:
                raise NotMigratedError(
                    f"history database {self.url_text} is at revision {rev!r}, unknown to this fusionrank version "
                    f"(head {head!r}): it was migrated by a newer version; upgrade fusionrank"
                )
            raise NotMigratedError(
                f"history database {self.url_text} is at revision {rev!r}, behind this version's {head!r}; {_UPGRADE_HINT}"
            )

    # -- writes
    def insert_events(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert validated event rows in one transaction; returns the ids actually stored (new ones).

        Each row has ``event_id, user_id, product_id, type, ts`` (aware datetime) and optional
        ``session_id, query``. ``INSERT ... ON CONFLICT (event_id) DO NOTHING`` on both dialects: a row
        whose id is stored already is skipped, so concurrent and repeated imports never store an event
        twice. Rows are written in id order (users, then events) so that concurrent writers take
        locks in the same order; deadlocks and lock timeouts are retried a few times.
        """
        if not rows:
            return []
        events = _event_tuples(rows)
        insert = self._copy_insert if self.dialect == "postgresql" else self._sqlite_insert
        return self._write(f"storing {len(events)} events", lambda conn: insert(conn, events))

    def _write(self, what: str, work: Callable[[Connection], _T], *, driver_errors: bool = False) -> _T:
        """``work(conn)`` in one transaction, retried a few times on deadlocks and lock timeouts; ``driver_errors``:
        the driver's own errors (psycopg / sqlite3, raised by work on the raw cursor) become :class:`HistoryError`."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with sql_errors(what, self.url):
                    try:
                        with self.engine.begin() as conn:
                            return work(conn)
                    except exc.DBAPIError as e:
                        if attempt < WRITE_ATTEMPTS and _is_transient(e):
                            raise _Retry from e
                        raise
            except _Retry as r:
                log.warning("history write conflict (%s); retrying (%d/%d)", _first_line(r.__cause__), attempt, WRITE_ATTEMPTS)
                time.sleep(0.05 * 2**attempt)
            except Exception as e:
                if not driver_errors or isinstance(e, HistoryError):
                    raise
                raise HistoryError(f"{what} failed on {self.url_text}: {e}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _sqlite_insert(self, conn: Connection, events: list[tuple[Any, ...]]) -> list[str]:
        """SQLite: ``executemany`` into a temporary table, then ``INSERT ... SELECT ... ON CONFLICT DO
        NOTHING RETURNING`` (one statement per table; the driver's executemany cannot return rows)."""
        import sqlite3

        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        statement = ""
        try:
            statement = (
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (event_id TEXT, user_id TEXT, product_id TEXT, "
                "type TEXT, ts TEXT, session_id TEXT, query TEXT)"
            )
            cur.execute(statement)
            statement = f"DELETE FROM temp.{_STAGE}"
            cur.execute(statement)
            statement = f"INSERT INTO temp.{_STAGE} ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            cur.executemany(statement, [(e, u, p, t, _sqlite_ts(ts), s, q) for e, u, p, t, ts, s, q in events])
            # "WHERE true": SQLite's parser needs it between a SELECT and an upsert clause
            statement = (
                f"INSERT INTO users (user_id) SELECT DISTINCT user_id FROM temp.{_STAGE} WHERE true ORDER BY user_id "
                "ON CONFLICT (user_id) DO NOTHING"
            )
            cur.execute(statement)
            statement = (
                f"INSERT INTO events ({_COLS}) SELECT {_COLS} FROM temp.{_STAGE} WHERE true ORDER BY event_id "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            )
            cur.execute(statement)
            stored = [row[0] for row in cur.fetchall()]
            statement = f"DELETE FROM temp.{_STAGE}"
            cur.execute(statement)
            return stored
        except sqlite3.Error as e:  # the driver's own error -> SQLAlchemy's (IntegrityError, OperationalError, ...)
            raise exc.DBAPIError.instance(statement, None, e, sqlite3.Error) from e
        finally:
            cur.close()

    def _copy_insert(self, conn: Connection, events: list[tuple[Any, ...]]) -> list[str]:
        """PostgreSQL: COPY the batch into a temporary table, then ``INSERT ... SELECT ... ON CONFLICT
        DO NOTHING RETURNING`` (several times faster than multi-row INSERTs through the driver)."""
        import psycopg

        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        statement = ""
        try:
            statement = (
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (event_id text, user_id text, product_id text, "
                "type text, ts timestamptz, session_id text, query text) ON COMMIT DELETE ROWS"
            )
            cur.execute(statement)
            statement = f"COPY {_STAGE} ({_COLS}) FROM STDIN"
            with cur.copy(statement) as copy:
                for r in events:
                    copy.write_row(r)
            statement = (
                f"INSERT INTO users (user_id) SELECT DISTINCT user_id FROM {_STAGE} ORDER BY user_id "
                "ON CONFLICT (user_id) DO NOTHING"
            )
            cur.execute(statement)
            statement = (
                f"INSERT INTO events ({_COLS}) SELECT {_COLS} FROM {_STAGE} ORDER BY event_id "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            )
            cur.execute(statement)
            return [row[0] for row in cur.fetchall()]
        except psycopg.Error as e:  # the driver's own error -> SQLAlchemy's (IntegrityError, OperationalError, ...)
            raise exc.DBAPIError.instance(statement, None, e, psycopg.Error) from e
        finally:
            cur.close()

    # -- UBI search logs (migration 0004)
    def insert_rows(self, table: str, cols: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Insert rows into one of the UBI tables in one transaction, skipping rows whose key is stored
        already (``ON CONFLICT DO NOTHING``); returns how many were new. PostgreSQL: COPY into a temporary
        table, then one ``INSERT ... SELECT``; SQLite: ``executemany``. Timestamps are aware datetimes."""
        return self.insert_ubi_batch([(table, cols, rows)])[0][0]

    def insert_ubi_batch(
        self, tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]], history: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[list[int], list[str]]:
        """Rows of UBI tables (``(table, columns, rows)``, written in the order given: a search before what it
        showed) and history events (as :meth:`insert_events` takes them) in **one** transaction, so that a batch
        of an import is stored whole or not at all. Returns the number of new rows per table and the ids of the
        history events stored (new ones)."""
        for table, _cols, _rows in tables:
            if table not in _UBI_TABLES:
                raise HistoryError(f"insert_rows: unknown table {table!r}; valid: {', '.join(_UBI_TABLES)}")
        events = _event_tuples(history) if history else []
        if not events and not any(rows for _, _, rows in tables):
            return [0] * len(tables), []

        def work(conn: Connection) -> tuple[list[int], list[str]]:
            counts = [self._insert_rows_in(conn, table, cols, rows) if rows else 0 for table, cols, rows in tables]
            stored = (self._copy_insert if self.dialect == "postgresql" else self._sqlite_insert)(conn, events) if events else []
            return counts, stored

        what = [f"{len(rows)} rows into {table}" for table, _, rows in tables if rows] + ([f"{len(events)} events"] if events else [])
        return self._write("storing " + ", ".join(what), work, driver_errors=True)

    def _insert_rows_in(self, conn: Connection, table: str, cols: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        names = ", ".join(cols)
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if self.dialect == "postgresql":
                stage = f"fusionrank_stage_{table}"
                cur.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
                with cur.copy(f"COPY {stage} ({names}) FROM STDIN") as copy:
                    for s in range(0, len(rows), 5000):  # COPY text format, formatted here (write_row: ~10 us a row)
                        copy.write(_copy_text(rows[s : s + 5000]))
                cur.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} ON CONFLICT DO NOTHING")
                return int(cur.rowcount)
            marks = ", ".join("?" for _ in cols)
            conv: Sequence[Sequence[Any]] = rows
            if "ts" in cols:  # SQLite stores naive UTC text (as SQLAlchemy's DateTime does)
                k = list(cols).index("ts")
                # a log repeats timestamps: each distinct one converted once
                text: dict[Any, str | None] = {ts: _sqlite_ts(ts) for ts in {r[k] for r in rows} if ts is not None}
                text[None] = None
                conv = [(*r[:k], text[r[k]], *r[k + 1 :]) for r in rows]
            cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING", conv)
            return int(cur.rowcount)
        finally:
            cur.close()

    def known_query_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored UBI searches."""
        from rerank.history.models import UbiQuery

        out: set[str] = set()
        ids = sorted(set(ids))
        with sql_errors("reading UBI query ids", self.url), self.engine.connect() as conn:
            for s in range(0, len(ids), 1000):
                out.update(conn.execute(select(UbiQuery.query_id).where(UbiQuery.query_id.in_(ids[s : s + 1000]))).scalars())
        return out

    def count_rows(self, table: str) -> int:
        if table not in _UBI_TABLES:
            raise HistoryError(f"count_rows: unknown table {table!r}")
        with sql_errors(f"counting {table}", self.url), self.engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())

    def ubi_log(self) -> tuple[list[Any], list[Any]]:
        """The stored UBI log as :class:`rerank.history.ubi.UbiQuery` / ``UbiEvent`` records (for the click models)."""
        from rerank.history import ubi

        with sql_errors("reading the UBI log", self.url), self.engine.connect() as conn:
            shown: dict[str, list[tuple[int, str]]] = {}
            for qid, pos, pid in conn.exec_driver_sql("SELECT query_id, position, product_id FROM ubi_shown"):
                shown.setdefault(qid, []).append((pos, pid))
            queries = [
                ubi.UbiQuery(qid, uq, None, cid, uid, app, tuple(p for _, p in sorted(shown.get(qid, []))))
                for qid, uq, cid, uid, app in conn.exec_driver_sql("SELECT query_id, user_query, client_id, user_id, application FROM ubi_queries")
            ]
            events = [
                ubi.UbiEvent(eid, act, _utc(ts), qid, oid, pos, cid, uid, sid, app)
                for eid, act, qid, oid, pos, cid, uid, sid, app, ts in conn.exec_driver_sql(
                    "SELECT event_id, action_name, query_id, object_id, position, client_id, user_id, session_id, application, ts FROM ubi_events")
            ]
        return queries, events

    def analyze(self) -> None:
        """Refresh the planner statistics after a bulk load (PostgreSQL ``ANALYZE``; SQLite plans the
        history queries from the indexes alone, so nothing is done there)."""
        if self.dialect != "postgresql":
            return
        with sql_errors("analyzing the events table", self.url), self.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE users")
            conn.exec_driver_sql("ANALYZE events")

    # -- reads
    def recent_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]:
        """The user's newest ``limit`` events as ``(product_id, type, epoch_seconds)``, newest first."""
        with sql_errors(f"reading the events of user {user_id!r}", self.url), self.engine.connect() as conn:
            rows = conn.execute(self._recent, {"uid": user_id, "n": int(limit)}).all()
        return [(p, t, to_epoch(ts)) for p, t, ts in rows]

    def count_events(self, user_id: str | None = None) -> int:
        stmt = select(func.count()).select_from(Event)
        if user_id is not None:
            stmt = stmt.where(Event.user_id == user_id)
        with sql_errors("counting events", self.url), self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def count_users(self) -> int:
        with sql_errors("counting users", self.url), self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(User)).scalar_one())

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "HistoryStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HistoryStore({self.url_text!r})"


def _event_tuples(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """History event rows as the insert takes them: tuples in the column order, sorted by id (so that concurrent
    writers take locks in the same order), timestamps checked to be aware."""
    return sorted(
        (
            (r["event_id"], r["user_id"], r["product_id"], r["type"], _aware_utc(r["ts"], r["event_id"]), r.get("session_id"), r.get("query"))
            for r in rows
        ),
        key=lambda r: r[0],
    )


def _utc(ts: Any) -> datetime:
    """A timestamp read by a raw driver query: SQLite gives naive UTC text, PostgreSQL an aware datetime."""
    if not isinstance(ts, datetime):
        ts = datetime.fromisoformat(str(ts))
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _sqlite_ts(ts: datetime) -> str:
    """The text SQLAlchemy's SQLite ``DateTime`` stores (naive UTC, microseconds): sorts as time does."""
    return ts.replace(tzinfo=None).isoformat(" ", "microseconds")


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(v: Any) -> str:
    if v is None:
        return "\\N"
    if type(v) is str:
        return v.translate(_COPY_ESCAPES) if ("\\" in v or "\t" in v or "\n" in v or "\r" in v) else v
    if isinstance(v, datetime):
        return v.isoformat()
    return str(v)


def _copy_text(rows: Sequence[Sequence[Any]]) -> str:
    """Rows in PostgreSQL's COPY text format (tab-separated, ``\\N`` for NULL, backslash escapes)."""
    out = []
    for r in rows:
        try:  # fast path: every value a string with no character to escape
            line = "\t".join(r)
        except TypeError:
            line = None
        if line is None or line.count("\t") != len(r) - 1 or "\n" in line or "\\" in line or "\r" in line:
            line = "\t".join(map(_copy_value, r))
        out.append(line)
    out.append("")
    return "\n".join(out)


_STAGE = "fusionrank_events_stage"
_UBI_TABLES = ("ubi_queries", "ubi_shown", "ubi_events")
_COL_NAMES = ("event_id", "user_id", "product_id", "type", "ts", "session_id", "query")
_COLS = ", ".join(_COL_NAMES)


class _Retry(Exception):
    pass
