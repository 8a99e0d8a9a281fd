"""Models and their edit history: versions, edits, undo, revert, diff.

Researchers and admins only for now; participants will reach models through studies.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import ContextDep, ResearcherUser, SessionDep
from app.schemas import (
    DiffPublic,
    EditCommit,
    ErrorBody,
    JobPublic,
    ModelCreate,
    ModelPublic,
    RevertRequest,
    UndoRequest,
    VersionPublic,
)
from app.services import build_jobs, diffs, history, inspect

router = APIRouter(prefix="/models", tags=["models"])
_conflict = {409: {"model": ErrorBody, "description": "base_version is not the head; detail.current_version is"}}


@router.get("", response_model=list[ModelPublic])
def list_models(user: ResearcherUser, session: SessionDep,
                include_study_copies: Annotated[bool, Query(
                    description="Also list participants' private copies made by user studies.")] = False,
                ) -> list[ModelPublic]:
    return [ModelPublic.model_validate(m)
            for m in history.list_models(session, include_study_copies=include_study_copies)]


@router.post("", response_model=JobPublic, status_code=202, responses={
    404: {"model": ErrorBody, "description": "no such embedded dataset or concept bank"},
    409: {"model": ErrorBody, "description": "the name is taken, or a job is already making it"},
    422: {"model": ErrorBody}})
def train_model(body: ModelCreate, user: ResearcherUser, session: SessionDep, ctx: ContextDep) -> JobPublic:
    """Train PCBM (or PCBM-h) on an embedded dataset's train split over a concept bank, as a job.

    When the job is done its result holds ``model_id``: version 1 is registered and served.
    """
    job = build_jobs.request_train(session, ctx, user, name=body.name, embeddings=body.embeddings, bank=body.bank,
                                   hybrid=body.hybrid, lam=body.lam)
    return JobPublic.model_validate(job)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: int, user: ResearcherUser, session: SessionDep) -> ModelPublic:
    return ModelPublic.model_validate(history.get_model(session, model_id))


@router.get("/{model_id}/versions", response_model=list[VersionPublic])
def list_versions(model_id: int, user: ResearcherUser, session: SessionDep) -> list[VersionPublic]:
    return [VersionPublic.model_validate(v) for v in history.list_versions(session, model_id)]


@router.get("/{model_id}/versions/{number}", response_model=VersionPublic)
def get_version(model_id: int, number: int, user: ResearcherUser, session: SessionDep) -> VersionPublic:
    return VersionPublic.model_validate(history.get_version(session, model_id, number))


@router.post("/{model_id}/edits", response_model=VersionPublic, status_code=201, responses=_conflict)
def commit_edit(model_id: int, body: EditCommit, user: ResearcherUser, session: SessionDep,
                ctx: ContextDep) -> VersionPublic:
    """Apply edits to `base_version` and append the result as the new head version.

    The weights are exactly those `POST /models/{id}/preview` showed for the same edits, and
    the version keeps the per-split metrics of the edited head.
    """
    edits = [e.model_dump() for e in body.edits]
    metrics = None
    if ctx.models is not None:
        metrics = inspect.edit_metrics(ctx.models, model_id, edits, body.base_version, ctx.head_editor)
    version = history.commit_edit(
        session, ctx.artifacts, model_id, body.base_version, edits,
        author=user, editor=ctx.head_editor, message=body.message, metrics=metrics,
    )
    return VersionPublic.model_validate(version)


@router.post("/{model_id}/undo", response_model=VersionPublic, status_code=201, responses=_conflict)
def undo(model_id: int, body: UndoRequest, user: ResearcherUser, session: SessionDep,
         ctx: ContextDep) -> VersionPublic:
    """Append a version with the weights the head's parent had."""
    version = history.undo(session, ctx.artifacts, model_id, body.base_version, author=user, message=body.message)
    return VersionPublic.model_validate(version)


@router.post("/{model_id}/revert", response_model=VersionPublic, status_code=201, responses=_conflict)
def revert(model_id: int, body: RevertRequest, user: ResearcherUser, session: SessionDep,
           ctx: ContextDep) -> VersionPublic:
    """Append a version with the weights of `to_version`."""
    version = history.revert(session, ctx.artifacts, model_id, body.base_version, body.to_version,
                             author=user, message=body.message)
    return VersionPublic.model_validate(version)


@router.get("/{model_id}/diff", response_model=DiffPublic)
def diff(
    model_id: int, user: ResearcherUser, session: SessionDep, ctx: ContextDep,
    from_version: Annotated[int, Query(ge=1)], to_version: Annotated[int, Query(ge=1)],
    limit: Annotated[int, Query(ge=1, le=5000)] = 100,
) -> DiffPublic:
    """The weight and config changes from one version to another, largest first."""
    return DiffPublic.model_validate(
        diffs.diff_versions(session, ctx.artifacts, model_id, from_version, to_version, limit=limit)
    )
