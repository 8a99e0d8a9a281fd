"""User studies: researchers set them up and read the results; participants work under ``/studies/me``.

A researcher (or admin) manages their own studies; another researcher gets 404 for them.
Participants join with a single-use code (``POST /studies/join``, no account needed) and
then reach only ``/studies/me...``: their task, their tools, their own model. Every
participant request is logged as a study event (see app.services.study_events).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response

from app.context import AppContext
from app.deps import ContextDep, CurrentUser, ResearcherUser, SessionDep
from app.errors import Unavailable
from app.schemas import ErrorBody
from app.schemas_studies import (
    ClassWeightsPublic,
    CommitPublic,
    ConceptDetailPublic,
    ExamplesPublic,
    InvitationsCreate,
    InvitationsPublic,
    JoinedPublic,
    JoinRequest,
    ProgressRow,
    PruneRequest,
    StudyCreate,
    StudyPreviewPublic,
    StudyPublic,
    StudyTransition,
    StudyUpdate,
    SubmitPublic,
    SubmitRequest,
    SuggestionsPublic,
    UndoPublic,
    VersionRequest,
    WorkspacePublic,
)
from app.services import studies, study_analysis, study_export, study_work
from app.services import users as user_service
from app.services.model_service import ModelService
from app.services.study_events import StudyEventLog, attached_log


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    log = getattr(app.state, "study_events", None)
    if log is not None:
        log.close()  # store every queued event before the process goes


router = APIRouter(prefix="/studies", tags=["studies"], lifespan=_lifespan)

_conflict = {409: {"model": ErrorBody, "description": "Closed study, submitted model, time up, over budget, "
                                                       "or base_version is not your model's version"}}
_busy = {503: {"model": ErrorBody, "description": "Every preview slot is busy; retry after `Retry-After` seconds"}}


def models_of(ctx: AppContext) -> ModelService:
    if ctx.models is None:
        raise Unavailable("this server runs without a model service")
    return ctx.models


def event_log(request: Request, ctx: ContextDep) -> StudyEventLog:
    return attached_log(request.app.state, ctx.session_factory)


EventsDep = Annotated[StudyEventLog, Depends(event_log)]


def participant_work(user: CurrentUser, session: SessionDep, ctx: ContextDep) -> study_work.Work:
    """The calling participant's study and model: everything under /studies/me acts on these only."""
    participant, study = studies.participant_of(session, user)
    return study_work.load(session, models_of(ctx), ctx.artifacts, study, participant)


WorkDep = Annotated[study_work.Work, Depends(participant_work)]


# -- participants (declared first: "/me" and "/join" are not study ids) --------------------------

@router.post("/join", response_model=JoinedPublic, status_code=201,
             responses={404: {"model": ErrorBody, "description": "Invalid or used code"}, **_conflict})
def join(body: JoinRequest, session: SessionDep, ctx: ContextDep) -> JoinedPublic:
    """Redeem a single-use invitation code: a pseudonymous participant, their own model, a bearer token."""
    participant, user = studies.join(session, ctx.artifacts, body.code, consent=body.consent)
    _, token = user_service.create_token(session, user, "study")
    study = session.get(studies.Study, participant.study_id)
    return JoinedPublic(token=token, pseudonym=participant.pseudonym,
                        study={"name": study.name, "task": study.task})


@router.get("/me", response_model=WorkspacePublic)
def my_workspace(work: WorkDep, events: EventsDep) -> WorkspacePublic:
    """Your task, your tools, the timer, the budget left and your model's accuracy on the splits you may see."""
    return WorkspacePublic.model_validate(study_work.workspace(work, events, page="api:me"))


@router.get("/me/concepts", response_model=ClassWeightsPublic)
def my_concepts(work: WorkDep, events: EventsDep,
                class_name: Annotated[str | None, Query(alias="class", max_length=256)] = None) -> ClassWeightsPublic:
    """The concepts with a weight for a class, strongest first, and whether you pruned them."""
    return ClassWeightsPublic.model_validate(study_work.class_weights(work, class_name, events))


@router.get("/me/concept", response_model=ConceptDetailPublic)
def my_concept(work: WorkDep, events: EventsDep,
               concept: Annotated[str, Query(min_length=1, max_length=256)]) -> ConceptDetailPublic:
    """One concept's weight for every class."""
    return ConceptDetailPublic.model_validate(study_work.concept_detail(work, concept, events))


@router.get("/me/examples", response_model=ExamplesPublic)
def my_examples(work: WorkDep, events: EventsDep,
                concept: Annotated[str, Query(min_length=1, max_length=256)]) -> ExamplesPublic:
    """Images of the splits you may see where a concept is strongest (the maps tool)."""
    return ExamplesPublic.model_validate(study_work.concept_examples(work, concept, events))


@router.get("/me/images/file", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The image, re-encoded as PNG"}})
def my_image(work: WorkDep, ctx: ContextDep, id: Annotated[str, Query(min_length=1, max_length=1024)],
             size: Annotated[int | None, Query(ge=16, le=1024)] = None,
             concept: Annotated[str | None, Query(max_length=256, description="Overlay this concept's map.")] = None,
             ) -> Response:
    """An image of a split you may see (the maps tool), with a concept's map over it if asked."""
    content, media_type = study_work.image_png(work, models_of(ctx), id, size, concept)
    return Response(content, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})


@router.get("/me/suggestions", response_model=SuggestionsPublic, responses=_busy)
def my_suggestions(work: WorkDep, ctx: ContextDep, events: EventsDep) -> SuggestionsPublic:
    """Suggested prunes (the suggestions tool), chosen on the in-distribution split."""
    return SuggestionsPublic.model_validate(study_work.suggestions(work, models_of(ctx), events))


@router.post("/me/preview", response_model=StudyPreviewPublic, responses={**_conflict, **_busy})
def my_preview(body: PruneRequest, work: WorkDep, ctx: ContextDep, events: EventsDep) -> StudyPreviewPublic:
    """What pruning would do on the splits you may see (the preview tool); nothing is saved."""
    result = study_work.preview(work, models_of(ctx), body.base_version, [p.model_dump() for p in body.prunes],
                                events)
    return StudyPreviewPublic.model_validate(result)


@router.post("/me/edits", response_model=CommitPublic, status_code=201, responses=_conflict)
def my_edit(body: PruneRequest, work: WorkDep, user: CurrentUser, session: SessionDep, ctx: ContextDep,
            events: EventsDep) -> CommitPublic:
    """Prune concepts for a class: a new version of your model (within your edit budget)."""
    result = study_work.commit(session, ctx.artifacts, work, user, body.base_version,
                               [p.model_dump() for p in body.prunes], events)
    return CommitPublic.model_validate(result)


@router.post("/me/undo", response_model=UndoPublic, status_code=201, responses=_conflict)
def my_undo(body: VersionRequest, work: WorkDep, user: CurrentUser, session: SessionDep, ctx: ContextDep,
            events: EventsDep) -> UndoPublic:
    """Undo your last change (a new version with the weights before it)."""
    return UndoPublic.model_validate(study_work.undo(session, ctx.artifacts, work, user, body.base_version, events))


@router.post("/me/submit", response_model=SubmitPublic, responses=_conflict)
def my_submit(body: SubmitRequest, work: WorkDep, session: SessionDep, events: EventsDep) -> SubmitPublic:
    """Hand in your model as it is now; afterwards nothing can change."""
    return SubmitPublic.model_validate(study_work.submit(session, work, body.version, events))


# -- researchers -----------------------------------------------------------------------------------

def _public(session, study) -> StudyPublic:
    return StudyPublic.model_validate(studies.study_summary(session, study))


@router.get("", response_model=list[StudyPublic])
def list_studies(user: ResearcherUser, session: SessionDep) -> list[StudyPublic]:
    """Your studies (every study, for an admin), newest first."""
    return [_public(session, s) for s in studies.list_studies(session, user)]


@router.post("", response_model=StudyPublic, status_code=201)
def create_study(body: StudyCreate, user: ResearcherUser, session: SessionDep) -> StudyPublic:
    """A new study, in draft: change it freely, then open it and send invitations."""
    values = body.model_dump(exclude_unset=True)
    return _public(session, studies.create_study(session, user, **values))


@router.get("/{study_id}", response_model=StudyPublic)
def get_study(study_id: int, user: ResearcherUser, session: SessionDep) -> StudyPublic:
    return _public(session, studies.get_study(session, user, study_id))


@router.patch("/{study_id}", response_model=StudyPublic, responses=_conflict)
def update_study(study_id: int, body: StudyUpdate, user: ResearcherUser, session: SessionDep) -> StudyPublic:
    """Change a draft study (409 once it is open or closed)."""
    changes = body.model_dump(exclude_unset=True)
    return _public(session, studies.update_study(session, user, study_id, **changes))


@router.post("/{study_id}/open", response_model=StudyPublic, responses=_conflict)
def open_study(study_id: int, user: ResearcherUser, session: SessionDep,
               body: StudyTransition | None = None) -> StudyPublic:
    """Start a draft study: its invitations work from now on (409 once it is closed)."""
    return _public(session, studies.open_study(session, user, study_id, note=body.note if body else ""))


@router.post("/{study_id}/close", response_model=StudyPublic, responses=_conflict)
def close_study(study_id: int, user: ResearcherUser, session: SessionDep, events: EventsDep,
                body: StudyTransition | None = None) -> StudyPublic:
    """Freeze the study: no more joins, edits or submissions, and its set-up is fixed for good."""
    study = studies.close_study(session, user, study_id, note=body.note if body else "")
    events.flush()
    return _public(session, study)


@router.post("/{study_id}/invitations", response_model=InvitationsPublic, status_code=201, responses=_conflict)
def invite(study_id: int, body: InvitationsCreate, user: ResearcherUser, session: SessionDep) -> InvitationsPublic:
    """Single-use invitation codes and their join links (shown this once)."""
    codes = studies.create_invitations(session, user, study_id, body.count)
    return InvitationsPublic(codes=codes, links=[studies.join_path(c) for c in codes])


@router.get("/{study_id}/participants", response_model=list[ProgressRow])
def progress(study_id: int, user: ResearcherUser, session: SessionDep, ctx: ContextDep,
             events: EventsDep) -> list[ProgressRow]:
    """Each participant's progress: status, version, prunes kept, events logged."""
    study = studies.get_study(session, user, study_id)
    events.flush(timeout_s=2)
    return [ProgressRow.model_validate(r) for r in study_analysis.progress(session, ctx.artifacts, study)]


@router.get("/{study_id}/results", response_model=dict[str, Any])
def results(study_id: int, user: ResearcherUser, session: SessionDep, ctx: ContextDep,
            events: EventsDep) -> dict[str, Any]:
    """The dashboard's numbers: held-out accuracy of each participant, baselines, conditions, agreement."""
    study = studies.get_study(session, user, study_id)
    events.flush(timeout_s=2)
    return study_export.public_results(study_analysis.study_results(session, models_of(ctx), ctx.artifacts, study))


_MEDIA = {"csv": "application/zip", "parquet": "application/zip", "json": "application/json"}


_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get("/{study_id}/export", response_class=Response, responses={
    200: {"content": {"application/zip": _BINARY, "application/vnd.apache.parquet": _BINARY,
                      "text/csv": {"schema": {"type": "string"}}, "application/json": {"schema": {"type": "object"}}},
          "description": "CSV or Parquet files and study.json in a zip, one table (`table=`), or one JSON document"}})
def export(study_id: int, user: ResearcherUser, session: SessionDep, ctx: ContextDep, events: EventsDep,
           format: Literal["csv", "parquet", "json"] = "csv",
           table: Annotated[Literal["events", "participants", "submissions", "prunes", "baselines", "random_runs"]
                            | None, Query(description="Only this table (not with json).")] = None) -> Response:
    """Every logged event, every participant's result, submissions, prunes and baselines."""
    study = studies.get_study(session, user, study_id)
    if not events.flush():
        raise Unavailable("logged events are still being stored; try again in a moment",
                          headers={"Retry-After": "2"})
    bundle = study_export.export_bundle(session, models_of(ctx), ctx.artifacts, study)
    if table is not None and format != "json":
        name = f"study-{study.id}-{table}.{format}"
        content = (study_export.table_csv if format == "csv" else study_export.table_parquet)(
            table, bundle["tables"][table])
        media = "text/csv" if format == "csv" else "application/vnd.apache.parquet"
    elif format == "json":
        name, content, media = f"study-{study.id}.json", study_export.full_json(bundle), _MEDIA["json"]
    else:
        name, content, media = f"study-{study.id}-{format}.zip", study_export.zipped(bundle, format), _MEDIA[format]
    return Response(content, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})
