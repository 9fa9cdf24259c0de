"""the job queue (Procrastinate's schema on PostgreSQL) and dead-lettered studies

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 06:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_JOB_TABLES = (
    "procrastinate_periodic_defers",
    "procrastinate_events",
    "procrastinate_jobs",
    "procrastinate_workers",
    "procrastinate_version",
)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("failure_reason", sa.Text(), nullable=True))
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # The job queue lives in the same database as the results, so a job is deferred in the same transaction
        # as the state change that causes it. Procrastinate's own schema, applied as it ships (a multi-statement
        # script with no parameters: run on the driver connection, which takes it as one simple query).
        from procrastinate.schema import SchemaManager

        bind.connection.driver_connection.execute(SchemaManager.get_schema())  # type: ignore[union-attr]


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for table in _JOB_TABLES:
            op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("failure_reason")
        batch.drop_column("failed_at")
