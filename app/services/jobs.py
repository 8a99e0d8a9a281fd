"""Jobs: long work (embedding, training, concept learning) tracked in the database.

A job moves ``queued -> running -> done | failed | cancelled``. Every state change is a
conditional UPDATE on the expected current status, so two workers (or a worker and a
cancel request) can never both move the same job.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import utcnow, write_transaction
from app.errors import Conflict, InvalidInput, NotFound
from app.models import Job, JobStatus, Role, User
from app.services import audit

FINISHED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


def _json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"job {what} must be plain JSON: {exc}") from None


def can_see(user: User, job: Job) -> bool:
    return user.role in (Role.ADMIN, Role.RESEARCHER) or job.created_by_id == user.id


def create_job(session: Session, kind: str, params: dict[str, Any] | None = None, *, user: User | None) -> Job:
    if not kind or len(kind) > 64:
        raise InvalidInput("a job kind is 1-64 characters")
    with write_transaction(session):
        job = Job(kind=kind, params=_json(params or {}, "params"), status=JobStatus.QUEUED,
                  created_by_id=user.id if user else None)
        session.add(job)
        session.flush()
        audit.record(session, "job.create", user=user, object_type="job", object_id=job.id, payload={"kind": kind})
    return job


def get_job(session: Session, job_id: int, *, viewer: User | None = None) -> Job:
    """The job; with ``viewer``, a job they may not see is reported as missing."""
    job = session.get(Job, job_id)
    if job is None or (viewer is not None and not can_see(viewer, job)):
        raise NotFound(f"no job with id {job_id}")
    return job


def list_jobs(session: Session, *, viewer: User, limit: int = 50) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if viewer.role not in (Role.ADMIN, Role.RESEARCHER):
        query = query.where(Job.created_by_id == viewer.id)
    return list(session.scalars(query))


def active_jobs(session: Session, kinds: list[str]) -> list[Job]:
    """Queued or running jobs of ``kinds``, oldest first."""
    return list(session.scalars(select(Job).where(Job.kind.in_(kinds),
                                                  Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
                                .order_by(Job.id)))


def request_cancel(session: Session, job_id: int, *, user: User) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next progress report."""
    job = get_job(session, job_id, viewer=user)
    with write_transaction(session):
        now = utcnow()
        # Conditional on the status, like the worker's own moves, so neither overwrites the other.
        moved = session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, cancel_requested=True, stage="cancelled", finished_at=now,
                    updated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount or session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True, updated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
        if not moved:
            raise Conflict(f"job {job_id} has already finished")
        audit.record(session, "job.cancel", user=user, object_type="job", object_id=job_id)
    session.refresh(job)
    return job


def _transition(session: Session, job_id: int, expected: JobStatus, **values: Any) -> bool:
    values.setdefault("updated_at", utcnow())
    with write_transaction(session):
        moved = session.execute(
            update(Job).where(Job.id == job_id, Job.status == expected).values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
    return moved == 1


def claim_next(session: Session, kinds: list[str]) -> Job | None:
    """Move the oldest queued job of one of ``kinds`` to running and return it."""
    for _ in range(5):  # another worker may claim the same job first; then try the next one
        job_id = session.scalar(
            select(Job.id).where(Job.status == JobStatus.QUEUED, Job.kind.in_(kinds)).order_by(Job.id).limit(1)
        )
        session.rollback()  # end the read before the write transaction
        if job_id is None:
            return None
        if _transition(session, job_id, JobStatus.QUEUED, status=JobStatus.RUNNING, started_at=utcnow(),
                       attempts=Job.attempts + 1, stage="starting"):
            return session.get(Job, job_id, populate_existing=True)
    return None


def report_progress(session: Session, job_id: int, progress: float, stage: str | None = None) -> bool:
    """Store progress (clamped to 0..1); returns whether a cancel was requested."""
    values: dict[str, Any] = {"progress": min(1.0, max(0.0, float(progress)))}
    if stage is not None:
        values["stage"] = stage[:255]
    _transition(session, job_id, JobStatus.RUNNING, **values)
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def mark_done(session: Session, job_id: int, result: dict[str, Any] | None) -> bool:
    return _transition(session, job_id, JobStatus.RUNNING, status=JobStatus.DONE, progress=1.0, stage="done",
                       result=_json(result, "result"), finished_at=utcnow())


def mark_failed(session: Session, job_id: int, reason: str) -> bool:
    return _transition(session, job_id, JobStatus.RUNNING, status=JobStatus.FAILED, error=reason[:4000],
                       stage="failed", finished_at=utcnow())


def mark_cancelled(session: Session, job_id: int) -> bool:
    return _transition(session, job_id, JobStatus.RUNNING, status=JobStatus.CANCELLED, stage="cancelled",
                       finished_at=utcnow())


def release(session: Session, job_id: int, stage: str) -> bool:
    """Put a running job back in the queue to be resumed (the worker is shutting down)."""
    return _transition(session, job_id, JobStatus.RUNNING, status=JobStatus.QUEUED, stage=stage[:255],
                       started_at=None)


def requeue_interrupted(session: Session, *, max_attempts: int = 3) -> tuple[list[int], list[int]]:
    """After a restart: re-queue jobs left ``running`` (resumable), fail those tried too often.

    Returns ``(requeued_ids, failed_ids)``.
    """
    with write_transaction(session):
        stale = list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)))
        requeued, failed = [], []
        now = utcnow()
        for job in stale:
            if job.attempts >= max_attempts:
                job.status, job.finished_at, job.stage = JobStatus.FAILED, now, "failed"
                job.error = f"interrupted {job.attempts} times (server restarts); giving up"
                failed.append(job.id)
            elif job.cancel_requested:
                job.status, job.finished_at, job.stage = JobStatus.CANCELLED, now, "cancelled"
            else:
                job.status, job.stage, job.started_at = JobStatus.QUEUED, "resuming after a restart", None
                requeued.append(job.id)
            job.updated_at = now
    return requeued, failed
