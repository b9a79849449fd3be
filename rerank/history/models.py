"""SQLAlchemy 2 typed ORM models of the user-history store: ``users``, ``events``, the UBI tables and the admin reindex job records.

The schema itself is owned by the Alembic migrations in ``rerank/history/migrations``; these models
describe it for queries (a test checks that the migrated schema and the models agree).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text, func
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: The event types, in increasing order of intent.
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")

#: Longest accepted ``user_id`` / ``product_id`` / ``session_id`` (characters).
MAX_ID_LEN = 128
#: Longest accepted ``event_id`` (a derived id is 32 hex characters).
MAX_EVENT_ID_LEN = 64
#: Longest accepted search ``query`` text attached to an event.
MAX_QUERY_LEN = 2000

#: Name of Alembic's version table (its own name, so it cannot clash with a shop's own Alembic history).
VERSION_TABLE = "fusionrank_history_version"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored as naive UTC
    and comes back with ``tzinfo=UTC``. Naive datetimes are refused on the way in (they are ambiguous).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: history timestamps must be timezone-aware (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """A user seen in the event stream (created on their first event)."""

    __tablename__ = "users"

    user_id: Mapped[str] = mapped_column(String(MAX_ID_LEN), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


class Event(Base):
    """One interaction of a user with a product.

    ``event_id`` is the idempotency key: the id given by the producer, or, when the producer gives none,
    a deterministic id derived from the natural key (see :func:`rerank.history.ingest.derive_event_id`).
    """

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint("type IN (" + ", ".join(f"'{t}'" for t in EVENT_TYPES) + ")", name="type"),
        # "last K events of a user": an index range scan, newest first, no sort.
        Index("ix_events_user_id_ts", "user_id", "ts"),
    )

    event_id: Mapped[str] = mapped_column(String(MAX_EVENT_ID_LEN), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(MAX_ID_LEN), ForeignKey("users.user_id", ondelete="CASCADE"))
    product_id: Mapped[str] = mapped_column(String(MAX_ID_LEN))
    type: Mapped[str] = mapped_column(String(16))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    session_id: Mapped[str | None] = mapped_column(String(MAX_ID_LEN), nullable=True)
    query: Mapped[str | None] = mapped_column(Text, nullable=True)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())



class UbiQuery(Base):
    """One search of a UBI log (``ubi_queries``): the query text and who searched; what it showed is in ``ubi_shown``."""

    __tablename__ = "ubi_queries"

    query_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    user_query: Mapped[str] = mapped_column(Text)
    client_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(MAX_ID_LEN), nullable=True)
    application: Mapped[str | None] = mapped_column(String(100), nullable=True)
    ts: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    hits: Mapped[int] = mapped_column(Integer)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


class UbiShown(Base):
    """The product a search showed at a (1-based) position."""

    __tablename__ = "ubi_shown"

    query_id: Mapped[str] = mapped_column(String(100), ForeignKey("ubi_queries.query_id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str] = mapped_column(String(256))


class UbiEvent(Base):
    """One UBI event, as logged (impressions, clicks, carts, purchases, any other action). ``event_id`` is derived
    from the event's content (:func:`rerank.history.ubi.derive_event_id`): re-imports store nothing twice."""

    __tablename__ = "ubi_events"
    __table_args__ = (Index("ix_ubi_events_query_id", "query_id"),)

    event_id: Mapped[str] = mapped_column(String(MAX_EVENT_ID_LEN), primary_key=True)
    action_name: Mapped[str] = mapped_column(String(100))
    query_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    object_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    client_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    application: Mapped[str | None] = mapped_column(String(100), nullable=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


# ----------------------------------------------------------------------------- the admin reindex job records
# (``reindex_jobs``, ``reindex_batches``, migration 0003; the job logic that uses them is in workers.reindex_jobs)
JOB_STATUSES = ("running", "failed", "done", "abandoned")


class ReindexJob(Base):
    """One reindex job: its plan (JSON), where it is (``step``), and how it ended."""

    __tablename__ = "reindex_jobs"
    __table_args__ = (
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"),
        Index("ix_reindex_jobs_alias_created_at", "alias", "created_at"),
    )

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(255))
    target: Mapped[str] = mapped_column(String(255))
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    via: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(16))
    total_docs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_batches: Mapped[int | None] = mapped_column(Integer, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


class ReindexBatch(Base):
    """A finished fill batch of a job (ordinal range ``[start, stop)`` of the source) and what it did."""

    __tablename__ = "reindex_batches"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("reindex_jobs.job_id", ondelete="CASCADE"), primary_key=True)
    batch: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    copied: Mapped[int] = mapped_column(Integer)
    reencoded: Mapped[int] = mapped_column(Integer)
    unchanged: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    errors: Mapped[list[Any]] = mapped_column(JSON)
