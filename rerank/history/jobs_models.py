"""SQLAlchemy models of the admin reindex job records (``reindex_jobs``, ``reindex_batches``).

They live in the history store's database and metadata (migration ``0003``); the job logic that uses them
is in ``workers.reindex_jobs``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Float, ForeignKey, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from rerank.history.models import Base, UTCDateTime

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
