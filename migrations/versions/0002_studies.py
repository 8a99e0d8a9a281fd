"""User studies: studies, single-use invitations, participants and their event log.

Revision ID: 0002_studies
Revises: 0001_initial
Created: 2025-12-05
"""

import sqlalchemy as sa
from alembic import op

from app.db import UTCDateTime

revision = "0002_studies"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=f"pk_{table}")


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("consent_text", sa.Text(), nullable=False),
        sa.Column("visible_splits", _enum("study_visible_splits", "none", "in_distribution", "all"), nullable=False),
        sa.Column("target_split", sa.String(64), nullable=False),
        sa.Column("in_distribution_split", sa.String(64), nullable=True),
        sa.Column("conditions", sa.JSON(), nullable=False),
        sa.Column("time_limit_s", sa.Integer(), nullable=True),
        sa.Column("edit_budget", sa.Integer(), nullable=True),
        sa.Column("status", _enum("study_status", "draft", "open", "closed"), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("opened_at", UTCDateTime(), nullable=True),
        sa.Column("closed_at", UTCDateTime(), nullable=True),
        _pk("studies"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name="fk_studies_owner_id_users"),
        sa.ForeignKeyConstraint(["base_model_id"], ["models.id"], name="fk_studies_base_model_id_models"),
    )
    op.create_index("ix_studies_owner_id", "studies", ["owner_id"])
    op.create_index("ix_studies_base_model_id", "studies", ["base_model_id"])

    op.create_table(
        "study_invitations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        _pk("study_invitations"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_study_invitations_study_id_studies",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("code_hash", name="uq_study_invitations_code_hash"),
    )
    op.create_index("ix_study_invitations_study_id", "study_invitations", ["study_id"])

    op.create_table(
        "study_participants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("invitation_id", sa.Integer(), nullable=True),
        sa.Column("pseudonym", sa.String(32), nullable=False),
        sa.Column("condition", sa.String(64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("joined_at", UTCDateTime(), nullable=False),
        sa.Column("deadline_at", UTCDateTime(), nullable=True),
        sa.Column("submitted_at", UTCDateTime(), nullable=True),
        sa.Column("submitted_version", sa.Integer(), nullable=True),
        _pk("study_participants"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_study_participants_study_id_studies",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_study_participants_user_id_users",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["invitation_id"], ["study_invitations.id"],
                                name="fk_study_participants_invitation_id_study_invitations", ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_study_participants_model_id_models"),
        sa.UniqueConstraint("user_id", name="uq_study_participants_user_id"),
        sa.UniqueConstraint("invitation_id", name="uq_study_participants_invitation_id"),
        sa.UniqueConstraint("study_id", "pseudonym", name="uq_study_participants_study_id_pseudonym"),
    )
    op.create_index("ix_study_participants_study_id", "study_participants", ["study_id"])

    op.create_table(
        "study_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("participant_id", sa.Integer(), nullable=True),
        sa.Column("pseudonym", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _pk("study_events"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_study_events_study_id_studies",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["participant_id"], ["study_participants.id"],
                                name="fk_study_events_participant_id_study_participants", ondelete="CASCADE"),
    )
    op.create_index("ix_study_events_study_id_id", "study_events", ["study_id", "id"])
    op.create_index("ix_study_events_participant_id", "study_events", ["participant_id"])


def downgrade() -> None:
    for table in ("study_events", "study_participants", "study_invitations", "studies"):
        op.drop_table(table)
