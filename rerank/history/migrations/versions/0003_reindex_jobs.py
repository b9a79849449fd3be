"""reindex_jobs and reindex_batches: the records of admin reindex jobs (progress, finished batch ranges)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reindex_jobs",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("alias", sa.String(255), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("total_docs", sa.Integer(), nullable=True),
        sa.Column("total_batches", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_reindex_jobs")),
        sa.CheckConstraint("status IN ('running', 'failed', 'done', 'abandoned')", name=op.f("ck_reindex_jobs_status")),
    )
    op.create_index(op.f("ix_reindex_jobs_alias_created_at"), "reindex_jobs", ["alias", "created_at"])
    op.create_table(
        "reindex_batches",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("stop", sa.Integer(), nullable=False),
        sa.Column("copied", sa.Integer(), nullable=False),
        sa.Column("reencoded", sa.Integer(), nullable=False),
        sa.Column("unchanged", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "batch", name=op.f("pk_reindex_batches")),
        sa.ForeignKeyConstraint(["job_id"], ["reindex_jobs.job_id"], name=op.f("fk_reindex_batches_job_id_reindex_jobs"), ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("reindex_batches")
    op.drop_index(op.f("ix_reindex_jobs_alias_created_at"), table_name="reindex_jobs")
    op.drop_table("reindex_jobs")
