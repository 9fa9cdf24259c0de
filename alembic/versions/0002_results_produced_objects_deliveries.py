"""results, produced objects, deliveries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 09:40:41.163831
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "study_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("device_uid", sa.String(length=64), nullable=False),
        sa.Column("doubt_threshold", sa.Float(), nullable=False),
        sa.Column("positive_threshold", sa.Float(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("images_scored", sa.Integer(), nullable=False),
        sa.Column("images_failed", sa.Integer(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sr_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("supersedes_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "study_version", "device_uid", name="uq_study_results_version_model"),
    )
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.create_index("ix_study_results_scored_at", ["scored_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_study_results_study_id"), ["study_id"], unique=False)

    op.create_table(
        "produced_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_result_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_result_id"], ["study_results.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("produced_objects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_produced_objects_study_result_id"), ["study_result_id"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("produced_object_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["produced_object_id"], ["produced_objects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("produced_object_id", "destination", name="uq_deliveries_object_destination"),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deliveries_produced_object_id"), ["produced_object_id"], unique=False)
        batch_op.create_index("ix_deliveries_state_next", ["state", "next_attempt_at"], unique=False)

    op.create_table(
        "image_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_result_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("category", sa.String(length=16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_result_id"], ["study_results.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_results_instance_id"), ["instance_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_image_results_study_result_id"), ["study_result_id"], unique=False)

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scorable", sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("scorable")

    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_results_study_result_id"))
        batch_op.drop_index(batch_op.f("ix_image_results_instance_id"))

    op.drop_table("image_results")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_state_next")
        batch_op.drop_index(batch_op.f("ix_deliveries_produced_object_id"))

    op.drop_table("deliveries")
    with op.batch_alter_table("produced_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_produced_objects_study_result_id"))

    op.drop_table("produced_objects")
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_results_study_id"))
        batch_op.drop_index("ix_study_results_scored_at")

    op.drop_table("study_results")
