"""users and events tables, with the index for "last K events of a user"

Revision ID: 0001
Revises:
Create Date: 2026-11-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_users")),
    )
    op.create_table(
        "events",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("product_id", sa.String(128), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=True),
        sa.Column("query", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_events")),
        sa.ForeignKeyConstraint(["user_id"], ["users.user_id"], name=op.f("fk_events_user_id_users"), ondelete="CASCADE"),
        sa.CheckConstraint("type IN ('view', 'click', 'add_to_cart', 'purchase')", name=op.f("ck_events_type")),
    )
    op.create_index(op.f("ix_events_user_id_ts"), "events", ["user_id", "ts"])


def downgrade() -> None:
    op.drop_index(op.f("ix_events_user_id_ts"), table_name="events")
    op.drop_table("events")
    op.drop_table("users")
