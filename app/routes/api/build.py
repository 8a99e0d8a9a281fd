"""Building models: register (embed) datasets and build concept banks, as jobs.

Training a model is ``POST /models`` (in :mod:`app.routes.api.models`). Each POST checks the
request completely, queues a job and answers 202 with it; follow it at ``GET /jobs/{id}``.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ContextDep, ResearcherUser, SessionDep
from app.schemas import BankCreate, BankPublic, DatasetCreate, DatasetPublic, ErrorBody, JobPublic
from app.services import build_jobs

router = APIRouter(tags=["build"])
_queued = {409: {"model": ErrorBody, "description": "the name is taken, or a job is already making it"},
           422: {"model": ErrorBody, "description": "a bad name or path, or an unknown backbone"}}


@router.get("/datasets", response_model=list[DatasetPublic])
def list_datasets(user: ResearcherUser, ctx: ContextDep) -> list[DatasetPublic]:
    """The served workspace's embedded datasets."""
    return [DatasetPublic.model_validate(row) for row in build_jobs.list_datasets(ctx)]


@router.post("/datasets", response_model=JobPublic, status_code=202, responses=_queued)
def register_dataset(body: DatasetCreate, user: ResearcherUser, session: SessionDep, ctx: ContextDep) -> JobPublic:
    """Embed a dataset on the server (an ImageFolder or a manifest under the data root) as a job."""
    job = build_jobs.request_embed(session, ctx, user, name=body.name, path=body.path, backbone=body.backbone,
                                   batch_size=body.batch_size)
    return JobPublic.model_validate(job)


@router.get("/banks", response_model=list[BankPublic])
def list_banks(user: ResearcherUser, ctx: ContextDep) -> list[BankPublic]:
    """The served workspace's concept banks."""
    return [BankPublic.model_validate(row) for row in build_jobs.list_banks(ctx)]


@router.post("/banks", response_model=JobPublic, status_code=202, responses=_queued)
def build_bank(body: BankCreate, user: ResearcherUser, session: SessionDep, ctx: ContextDep) -> JobPublic:
    """Build a text concept bank from phrases, or learn CAVs from concept-example images, as a job."""
    job = build_jobs.request_bank(session, ctx, user, name=body.name, kind=body.kind, phrases=body.phrases,
                                  examples=body.examples)
    return JobPublic.model_validate(job)
