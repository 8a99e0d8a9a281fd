"""Tables of user studies: the study, its invitations, its participants and their event log.

A study belongs to a researcher and names a base model version; each participant edits
their own copy of it (a :class:`~app.models.Model` branched from that version). The event
log is append-only. Like :mod:`app.models`, nothing here commits: services own transactions.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow

TOOLS = ("weights", "maps", "preview", "suggestions")  # what a condition may give participants


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # As app.models: VARCHAR plus a CHECK constraint, portable across SQLite and PostgreSQL.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda members: [m.value for m in members])


class StudyStatus(str, enum.Enum):
    DRAFT = "draft"  # being set up: configurable, nobody can join
    OPEN = "open"  # invitations work, participants edit
    CLOSED = "closed"  # frozen: no joins, no edits, no config changes


class VisibleSplits(str, enum.Enum):
    NONE = "none"  # participants see no accuracy at all
    IN_DISTRIBUTION = "in_distribution"  # only the study's in-distribution split
    ALL = "all"  # every split except the held-out target split


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    base_version: Mapped[int] = mapped_column(Integer)  # the version every participant's copy starts from
    task: Mapped[str] = mapped_column(Text)
    consent_text: Mapped[str] = mapped_column(Text, default="")
    visible_splits: Mapped[VisibleSplits] = mapped_column(_enum(VisibleSplits, "study_visible_splits"))
    # The held-out split the study is scored on; never shown to participants.
    target_split: Mapped[str] = mapped_column(String(64))
    in_distribution_split: Mapped[str | None] = mapped_column(String(64))
    # [{"name": str, "tools": [str, ...]}]: one entry per between-subject condition.
    conditions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    time_limit_s: Mapped[int | None] = mapped_column(Integer)  # None: no time limit
    edit_budget: Mapped[int | None] = mapped_column(Integer)  # most prunes a participant may keep; None: any
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "study_status"), default=StudyStatus.DRAFT)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class StudyInvitation(Base):
    """A single-use invitation; only the code's hash is stored (the code is shown once)."""

    __tablename__ = "study_invitations"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the code's first characters, to recognise it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Participant(Base):
    """One person taking part: a participant user, a condition and their own model copy."""

    __tablename__ = "study_participants"
    __table_args__ = (UniqueConstraint("study_id", "pseudonym"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    invitation_id: Mapped[int | None] = mapped_column(
        ForeignKey("study_invitations.id", ondelete="SET NULL"), unique=True)
    pseudonym: Mapped[str] = mapped_column(String(32))
    condition: Mapped[str] = mapped_column(String(64))
    # The participant's copy of the base model (made right after joining; NULL for a moment).
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # also when consent was given
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    submitted_version: Mapped[int | None] = mapped_column(Integer)


class StudyEvent(Base):
    """One logged action, with the server's time, the participant's pseudonym and model version."""

    __tablename__ = "study_events"
    __table_args__ = (Index("ix_study_events_study_id_id", "study_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    participant_id: Mapped[int | None] = mapped_column(
        ForeignKey("study_participants.id", ondelete="CASCADE"), index=True)
    pseudonym: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))  # see app.services.studies.EVENT_KINDS
    model_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
