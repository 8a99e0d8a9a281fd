"""The participant's workspace: the task, the tools of their condition, a timer, the budget, submit.

Participants reach nothing else: the model pages, other participants' work, the study's
configuration and the held-out target split are not theirs to see. Each route logs one
study event (page views, classes and concepts looked at, maps, previews, edits, submit);
the status fragment, polled for the timer, does not.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import ContextDep, SessionDep
from app.errors import AppError, InvalidInput, Unavailable
from app.models import User
from app.routes.pages.common import PageRoute, PageUser, is_htmx, redirect, render, render_fragment
from app.services import studies, study_work
from app.services.study_events import StudyEventLog, attached_log
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)

THUMB = 160
Text = Annotated[str | None, Query(max_length=256)]


def work_of(request: Request, user: PageUser, session: SessionDep, ctx: ContextDep) -> study_work.Work:
    """The signed-in participant's study and model (403 for staff, 404 outside any study)."""
    participant, study = studies.participant_of(session, user)
    if ctx.models is None:
        raise Unavailable("this server has no model service, so studies cannot run right now")
    return study_work.load(session, ctx.models, ctx.artifacts, study, participant)


WorkDep = Annotated[study_work.Work, Depends(work_of)]


def events_of(request: Request, ctx: ContextDep) -> StudyEventLog:
    return attached_log(request.app.state, ctx.session_factory)


EventsDep = Annotated[StudyEventLog, Depends(events_of)]


def _pending(raw: str) -> list[dict[str, str]]:
    """Prunes a form carries as JSON: ``[{"concept", "class_name"}]``."""
    try:
        data = json.loads(raw or "[]")
    except ValueError:
        raise InvalidInput("the pending prunes are not valid; reload the page") from None
    if not isinstance(data, list) or len(data) > study_work.MAX_PRUNES_PER_EDIT:
        raise InvalidInput("the pending prunes are not valid; reload the page")
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("concept"), str) \
                or not isinstance(item.get("class_name"), str):
            raise InvalidInput("the pending prunes are not valid; reload the page")
        unit = {"concept": item["concept"][:256], "class_name": item["class_name"][:256]}
        if unit not in out:
            out.append(unit)
    return out


def _with(pending: list[dict[str, str]], concept: str, class_name: str) -> list[dict[str, str]]:
    if not concept:
        return pending
    if not class_name:
        raise InvalidInput("choose the class to prune the concept for")
    unit = {"concept": concept, "class_name": class_name}
    return pending if unit in pending else [*pending, unit]


def _preview_view(result: dict[str, Any] | None, pending: list[dict[str, str]], base_version: int,
                  error: str = "") -> dict[str, Any]:
    return {"prunes": pending, "prunes_json": json.dumps(pending), "base_version": base_version,
            "splits": (result or {}).get("splits", []), "over_budget": (result or {}).get("over_budget", False),
            "error": error}


def workspace_page(request: Request, work: study_work.Work, events: StudyEventLog | None, *,
                   class_name: str | None = None, preview: dict[str, Any] | None = None,
                   messages: list[dict[str, str]] | None = None, status_code: int = 200) -> Response:
    view = study_work.workspace(work, events, page="workspace")
    chosen = class_name if class_name in work.entry.classes else None
    concepts = study_work.class_weights(work, chosen)
    return render(request, "study_work.html", {
        "work": view, "concepts": concepts, "preview": preview, "nav": "studies",
    }, status_code=status_code, messages=messages)


@router.get(PAGE_ROUTES["participate"], response_class=HTMLResponse)
def workspace(request: Request, work: WorkDep, events: EventsDep,
              class_name: Annotated[str | None, Query(alias="class", max_length=256)] = None) -> Response:
    """The task, the concept weights of a class with prune buttons, the tools, the timer, submit."""
    return workspace_page(request, work, events, class_name=class_name)


@router.get(PAGE_ROUTES["participate_status"], response_class=HTMLResponse)
def status(request: Request, work: WorkDep) -> Response:
    """_study_status.html: time and prunes left (polled for the timer; not logged)."""
    return render_fragment(request, "_study_status.html", {"status": study_work.status(work)})


@router.get(PAGE_ROUTES["participate_class"], response_class=HTMLResponse)
def class_concepts(request: Request, work: WorkDep, events: EventsDep,
                   class_name: Annotated[str | None, Query(alias="class", max_length=256)] = None) -> Response:
    """_study_concepts.html: one class's concepts, strongest first, with prune buttons."""
    view = study_work.workspace(work)
    return render_fragment(request, "_study_concepts.html", {
        "work": view, "concepts": study_work.class_weights(work, class_name, events)})


@router.get(PAGE_ROUTES["participate_concept"], response_class=HTMLResponse)
def concept(request: Request, work: WorkDep, events: EventsDep,
            concept: Annotated[str, Query(min_length=1, max_length=256)]) -> Response:
    """_study_concept.html: one concept's weight for every class."""
    return render_fragment(request, "_study_concept.html", {
        "concept": study_work.concept_detail(work, concept, events)})


@router.get(PAGE_ROUTES["participate_examples"], response_class=HTMLResponse)
def examples(request: Request, work: WorkDep, events: EventsDep,
             concept: Annotated[str, Query(min_length=1, max_length=256)]) -> Response:
    """_study_examples.html: images of the shown splits where the concept is strongest (maps tool)."""
    return render_fragment(request, "_study_examples.html", {
        "examples": study_work.concept_examples(work, concept, events), "size": THUMB})


@router.get(PAGE_ROUTES["participate_image"])
def image(work: WorkDep, ctx: ContextDep, id: Annotated[str, Query(min_length=1, max_length=1024)],
          size: Text = None, concept: Text = None) -> Response:
    """A shown split's image, re-encoded, with the concept's map over it when maps can be made."""
    side = THUMB if not size or not size.isdigit() else max(32, min(640, int(size)))
    data, media_type = study_work.image_png(work, ctx.models, id, side, concept)
    return Response(data, media_type=media_type, headers={
        "Cache-Control": "private, max-age=300", "Content-Security-Policy": "default-src 'none'"})


@router.get(PAGE_ROUTES["participate_suggestions"], response_class=HTMLResponse)
def suggestions(request: Request, work: WorkDep, ctx: ContextDep, events: EventsDep) -> Response:
    """_study_suggestions.html: prunes the suggestions tool proposes."""
    return render_fragment(request, "_study_suggestions.html", {
        "suggestions": study_work.suggestions(work, ctx.models, events), "work": study_work.workspace(work)})


@router.post(PAGE_ROUTES["participate_preview"], response_class=HTMLResponse)
def preview(request: Request, work: WorkDep, ctx: ContextDep, events: EventsDep,
            base_version: Annotated[int, Form(ge=1)],
            prunes: Annotated[str, Form(max_length=20_000)] = "[]",
            prune: Annotated[str, Form(max_length=256)] = "",
            class_name: Annotated[str, Form(alias="class", max_length=256)] = "") -> Response:
    """What the pending prunes plus the one just clicked would do on the shown splits (nothing saved)."""
    pending = _pending(prunes)
    status_code = 200
    try:
        pending = _with(pending, prune.strip(), class_name.strip())
        result = study_work.preview(work, ctx.models, base_version, pending, events)
        view = _preview_view(result, pending, work.version)
    except AppError as exc:
        view, status_code = _preview_view(None, pending, work.version, exc.message), exc.status_code
    if is_htmx(request):
        return render_fragment(request, "_study_preview.html", {"preview": view, "work": study_work.workspace(work)})
    return workspace_page(request, work, events, class_name=class_name or None, preview=view,
                          status_code=status_code)


def _commit_refused(request: Request, work: study_work.Work, events: StudyEventLog, exc: AppError,
                    class_name: str | None) -> Response:
    return workspace_page(request, work, events, class_name=class_name,
                          messages=[{"level": "error", "text": exc.message}], status_code=exc.status_code)


@router.post(PAGE_ROUTES["participate_commit"], response_class=HTMLResponse)
def commit(request: Request, work: WorkDep, user: PageUser, session: SessionDep, ctx: ContextDep,
           events: EventsDep, base_version: Annotated[int, Form(ge=1)],
           prunes: Annotated[str, Form(max_length=20_000)] = "[]",
           prune: Annotated[str, Form(max_length=256)] = "",
           class_name: Annotated[str, Form(alias="class", max_length=256)] = "") -> Response:
    """Save the pending prunes (or the one clicked) as a new version of the participant's model."""
    try:
        pending = _with(_pending(prunes), prune.strip(), class_name.strip())
        result = study_work.commit(session, ctx.artifacts, work, user, base_version, pending, events)
    except AppError as exc:
        session.rollback()
        return _commit_refused(request, _reload(request, user, session, ctx), events, exc, class_name or None)
    done = ", ".join(f"“{p['concept']}” for {p['class_name']}" for p in result["prunes"])
    return redirect(url("participate", **{"class": class_name} if class_name else {}),
                    flash=("success", f"Pruned {done}: your model is at version {result['version']}."))


def _reload(request: Request, user: User, session, ctx) -> study_work.Work:
    return work_of(request, user, session, ctx)


@router.post(PAGE_ROUTES["participate_undo"], response_class=HTMLResponse)
def undo(request: Request, work: WorkDep, user: PageUser, session: SessionDep, ctx: ContextDep, events: EventsDep,
         base_version: Annotated[int, Form(ge=1)]) -> Response:
    """Undo the last change of the participant's model."""
    try:
        result = study_work.undo(session, ctx.artifacts, work, user, base_version, events)
    except AppError as exc:
        session.rollback()
        return _commit_refused(request, _reload(request, user, session, ctx), events, exc, None)
    return redirect(url("participate"), flash=("success", f"Undone: your model is at version {result['version']}."))


@router.post(PAGE_ROUTES["participate_submit"], response_class=HTMLResponse)
def submit(request: Request, work: WorkDep, user: PageUser, session: SessionDep, ctx: ContextDep,
           events: EventsDep, version: Annotated[int, Form(ge=1)],
           confirm: Annotated[str, Form(max_length=8)] = "") -> Response:
    """Hand in the model as it is; afterwards the workspace is read-only."""
    try:
        if confirm != "yes":
            raise InvalidInput("tick the box to confirm that you are finished")
        study_work.submit(session, work, version, events)
    except AppError as exc:
        session.rollback()
        return _commit_refused(request, _reload(request, user, session, ctx), events, exc, None)
    return redirect(url("participate"), flash=("success", "Thank you! Your model is submitted."))
