"""The audit log: who did what to which object, written in the same transaction as the act."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import AuditEvent, User


def record(
    session: Session,
    action: str,
    *,
    user: User | None,
    object_type: str,
    object_id: int | str,
    payload: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an event to the caller's transaction (it commits or rolls back with the act)."""
    event = AuditEvent(
        action=action,
        user_id=user.id if user is not None else None,
        object_type=object_type,
        object_id=str(object_id),
        payload=payload or {},
    )
    session.add(event)
    return event


def list_events(
    session: Session,
    *,
    object_type: str | None = None,
    object_id: int | str | None = None,
    action: str | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Newest first."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if object_type is not None:
        query = query.where(AuditEvent.object_type == object_type)
    if object_id is not None:
        query = query.where(AuditEvent.object_id == str(object_id))
    if action is not None:
        query = query.where(AuditEvent.action == action)
    return list(session.scalars(query))
