"""ubi_queries, ubi_shown, ubi_events: UBI 1.3 search logs (searches, what was shown at which position, every event)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ubi_queries",
        sa.Column("query_id", sa.String(100), nullable=False),
        sa.Column("user_query", sa.Text(), nullable=False),
        sa.Column("client_id", sa.String(100), nullable=True),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("application", sa.String(100), nullable=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=True),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("query_id", name=op.f("pk_ubi_queries")),
    )
    op.create_table(
        "ubi_shown",
        sa.Column("query_id", sa.String(100), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("query_id", "position", name=op.f("pk_ubi_shown")),
        sa.ForeignKeyConstraint(["query_id"], ["ubi_queries.query_id"], name=op.f("fk_ubi_shown_query_id_ubi_queries"), ondelete="CASCADE"),
    )
    op.create_table(
        "ubi_events",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("action_name", sa.String(100), nullable=False),
        sa.Column("query_id", sa.String(100), nullable=True),  # no foreign key: an event may come before (or without) its query
        sa.Column("object_id", sa.String(256), nullable=True),
        sa.Column("position", sa.Integer(), nullable=True),
        sa.Column("client_id", sa.String(100), nullable=True),
        sa.Column("user_id", sa.String(100), nullable=True),
        sa.Column("session_id", sa.String(100), nullable=True),
        sa.Column("application", sa.String(100), nullable=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_ubi_events")),
    )
    op.create_index(op.f("ix_ubi_events_query_id"), "ubi_events", ["query_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_ubi_events_query_id"), table_name="ubi_events")
    op.drop_table("ubi_events")
    op.drop_table("ubi_shown")
    op.drop_table("ubi_queries")
