"""the database's identity (a data directory records it, to refuse another database); dashboard sessions

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 11:40:00.000000
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "installation",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("database_uid", sa.String(36), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("token_id", sa.Integer(), sa.ForeignKey("api_tokens.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dashboard_sessions_token_id", "dashboard_sessions", ["token_id"])
    now = datetime.now(UTC)
    op.bulk_insert(
        table,
        [{"id": 1, "database_uid": str(uuid.uuid4()), "created_at": now.replace(tzinfo=None) if _sqlite() else now}],
    )


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def downgrade() -> None:
    op.drop_index("ix_dashboard_sessions_token_id", "dashboard_sessions")
    op.drop_table("dashboard_sessions")
    op.drop_table("installation")
