"""The app's tables. Heavy arrays live in the artifact store; rows hold metadata and history.

Models never commit: services own transactions. Studies (participants editing under
controlled conditions) will add their own tables next to these; audit events already
carry a free ``object_type`` so study events fit without a schema change to this file.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Enum, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, UTCDateTime, utcnow


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR with a CHECK constraint: portable, and adding a value is a small migration.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda members: [m.value for m in members])


class Role(str, enum.Enum):
    ADMIN = "admin"
    RESEARCHER = "researcher"
    PARTICIPANT = "participant"


class ModelKind(str, enum.Enum):
    PCBM = "pcbm"
    PCBM_H = "pcbm_h"


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "user_role"))
    # NULL: the user cannot log in with a password (only tokens or one-time links).
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    # sha256 of the token: tokens are long random strings, so a fast hash is enough.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship()

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class LoginLink(Base):
    """A single-use login token, as printed by ``pcbm demo``; only its hash is stored."""

    __tablename__ = "login_links"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # Path of the manifest or image folder, relative to the workspace.
    source: Mapped[str] = mapped_column(String(1024))
    classes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # {"splits": {name: n_images}, "groups": {name: n_images}, ...}
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Backbone(Base):
    __tablename__ = "backbones"

    id: Mapped[int] = mapped_column(primary_key=True)
    spec: Mapped[str] = mapped_column(String(1024))
    # sha256 over spec, weights and preprocessing (ml.backbone.Backbone.identity).
    identity: Mapped[str] = mapped_column(String(64), unique=True)
    embed_dim: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConceptBank(Base):
    __tablename__ = "concept_banks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"), index=True)
    # Workspace-relative directory of the bank's safetensors file, if it lives on disk.
    source: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    concepts: Mapped[list[Concept]] = relationship(
        back_populates="bank", order_by="Concept.index", cascade="all, delete-orphan"
    )


class Concept(Base):
    __tablename__ = "concepts"
    __table_args__ = (
        UniqueConstraint("bank_id", "index"),
        UniqueConstraint("bank_id", "name"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("concept_banks.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)  # column of the bank's vectors / the head's weight
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(32))  # "text" | "cav" | "discovered"
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    bank: Mapped[ConceptBank] = relationship(back_populates="concepts")


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[ModelKind] = mapped_column(_enum(ModelKind, "model_kind"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"), index=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("concept_banks.id"), index=True)
    # The head version and its number. ``head_number`` is the optimistic lock: a commit
    # moves it from N to N+1 with a conditional UPDATE, so two commits on N cannot both win.
    head_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", use_alter=True, name="fk_models_head_version_id_model_versions")
    )
    head_number: Mapped[int] = mapped_column(Integer, default=0)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    dataset: Mapped[Dataset] = relationship()
    backbone: Mapped[Backbone] = relationship()
    bank: Mapped[ConceptBank] = relationship()
    head_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[head_version_id], post_update=True)


class ModelVersion(Base):
    """One immutable head state. Versions are only ever appended, never changed or deleted."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, 3, ... per model, contiguous
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    # What produced this version: {"op": "initial"|"edit"|"undo"|"revert", ...}.
    edit: Mapped[dict[str, Any]] = mapped_column(JSON)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    weights_hash: Mapped[str] = mapped_column(String(64), index=True)  # ml.store.tensors_sha256
    artifact_key: Mapped[str] = mapped_column(String(255))  # path under the artifact store
    head_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # SparseLinearHead config
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    author: Mapped[User | None] = relationship()
    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.QUEUED)
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    stage: Mapped[str] = mapped_column(String(255), default="")
    error: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # starts, including resumes after a restart
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_object", "object_type", "object_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    action: Mapped[str] = mapped_column(String(64))  # e.g. "model.edit", "token.create"
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
