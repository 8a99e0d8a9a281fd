"""Jobs: progress of long work, and cancelling it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CurrentUser, SessionDep
from app.schemas import ErrorBody, JobPublic
from app.services import jobs as job_service

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=list[JobPublic])
def list_jobs(user: CurrentUser, session: SessionDep,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[JobPublic]:
    """Newest first; participants see their own jobs only."""
    return [JobPublic.model_validate(j) for j in job_service.list_jobs(session, viewer=user, limit=limit)]


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: int, user: CurrentUser, session: SessionDep) -> JobPublic:
    return JobPublic.model_validate(job_service.get_job(session, job_id, viewer=user))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={409: {"model": ErrorBody}})
def cancel_job(job_id: int, user: CurrentUser, session: SessionDep) -> JobPublic:
    return JobPublic.model_validate(job_service.request_cancel(session, job_id, user=user))
