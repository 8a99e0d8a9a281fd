"""Initial schema: users, tokens, login links, catalog, models and versions, jobs, audit log.

Revision ID: 0001_initial
Revises:
Created: 2025-11-28
"""

import sqlalchemy as sa
from alembic import op

from app.db import UTCDateTime

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=f"pk_{table}")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", _enum("user_role", "admin", "researcher", "participant"), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _pk("users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        _pk("api_tokens"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_api_tokens_user_id_users", ondelete="CASCADE"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "login_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        _pk("login_links"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_login_links_user_id_users", ondelete="CASCADE"),
        sa.UniqueConstraint("token_hash", name="uq_login_links_token_hash"),
    )
    op.create_index("ix_login_links_user_id", "login_links", ["user_id"])

    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _pk("datasets"),
        sa.UniqueConstraint("name", name="uq_datasets_name"),
    )
    op.create_table(
        "backbones",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("spec", sa.String(1024), nullable=False),
        sa.Column("identity", sa.String(64), nullable=False),
        sa.Column("embed_dim", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _pk("backbones"),
        sa.UniqueConstraint("identity", name="uq_backbones_identity"),
    )
    op.create_table(
        "concept_banks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(1024), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _pk("concept_banks"),
        sa.ForeignKeyConstraint(["backbone_id"], ["backbones.id"], name="fk_concept_banks_backbone_id_backbones"),
        sa.UniqueConstraint("name", name="uq_concept_banks_name"),
    )
    op.create_index("ix_concept_banks_backbone_id", "concept_banks", ["backbone_id"])
    op.create_table(
        "concepts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bank_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        _pk("concepts"),
        sa.ForeignKeyConstraint(
            ["bank_id"], ["concept_banks.id"], name="fk_concepts_bank_id_concept_banks", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("bank_id", "index", name="uq_concepts_bank_id_index"),
        sa.UniqueConstraint("bank_id", "name", name="uq_concepts_bank_id_name"),
    )

    # models <-> model_versions reference each other. SQLite accepts a foreign key to a
    # table created later, and cannot add one afterwards without rebuilding the table;
    # other databases add it once both tables exist.
    head_fk = sa.ForeignKeyConstraint(
        ["head_version_id"], ["model_versions.id"], name="fk_models_head_version_id_model_versions"
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", _enum("model_kind", "pcbm", "pcbm_h"), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column("bank_id", sa.Integer(), nullable=False),
        sa.Column("head_version_id", sa.Integer(), nullable=True),
        sa.Column("head_number", sa.Integer(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _pk("models"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_models_dataset_id_datasets"),
        sa.ForeignKeyConstraint(["backbone_id"], ["backbones.id"], name="fk_models_backbone_id_backbones"),
        sa.ForeignKeyConstraint(["bank_id"], ["concept_banks.id"], name="fk_models_bank_id_concept_banks"),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["users.id"], name="fk_models_created_by_id_users", ondelete="SET NULL"
        ),
        sa.UniqueConstraint("name", name="uq_models_name"),
        *([head_fk] if sqlite else []),
    )
    op.create_index("ix_models_dataset_id", "models", ["dataset_id"])
    op.create_index("ix_models_backbone_id", "models", ["backbone_id"])
    op.create_index("ix_models_bank_id", "models", ["bank_id"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("edit", sa.JSON(), nullable=False),
        sa.Column("author_id", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("weights_hash", sa.String(64), nullable=False),
        sa.Column("artifact_key", sa.String(255), nullable=False),
        sa.Column("head_config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        _pk("model_versions"),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_model_versions_model_id_models", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["parent_id"], ["model_versions.id"], name="fk_model_versions_parent_id_model_versions"),
        sa.ForeignKeyConstraint(
            ["author_id"], ["users.id"], name="fk_model_versions_author_id_users", ondelete="SET NULL"
        ),
        sa.UniqueConstraint("model_id", "number", name="uq_model_versions_model_id_number"),
    )
    op.create_index("ix_model_versions_weights_hash", "model_versions", ["weights_hash"])
    if not sqlite:
        op.create_foreign_key(
            "fk_models_head_version_id_model_versions", "models", "model_versions", ["head_version_id"], ["id"]
        )

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("status", _enum("job_status", "queued", "running", "done", "failed", "cancelled"), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(255), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        _pk("jobs"),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["users.id"], name="fk_jobs_created_by_id_users", ondelete="SET NULL"
        ),
    )
    op.create_index("ix_jobs_status_id", "jobs", ["status", "id"])
    op.create_index("ix_jobs_created_by_id", "jobs", ["created_by_id"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _pk("audit_events"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_audit_events_user_id_users", ondelete="SET NULL"
        ),
    )
    op.create_index("ix_audit_events_created_at", "audit_events", ["created_at"])
    op.create_index("ix_audit_events_user_id", "audit_events", ["user_id"])
    op.create_index("ix_audit_events_object", "audit_events", ["object_type", "object_id"])


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("fk_models_head_version_id_model_versions", "models", type_="foreignkey")
    for table in ("audit_events", "jobs", "model_versions", "models", "concepts", "concept_banks",
                  "backbones", "datasets", "login_links", "api_tokens", "users"):
        op.drop_table(table)
