"""Study pages for researchers (list, new, dashboard) and the invitation page participants join from.

The JSON twins are under ``/api/v1/studies``; both call the same services. Participants
who open ``/studies`` are sent to their own workspace (app/routes/pages/participate.py).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from app import plots
from app.context import AppContext
from app.deps import ContextDep, SessionDep, start_browser_session
from app.errors import AppError, InvalidInput
from app.models import Role
from app.models_studies import TOOLS, Participant, Study
from app.routes.pages.common import PageRoute, PageUser, StaffUser, redirect, render, set_flash
from app.security import csrf_matches
from app.services import history, studies, study_analysis
from app.services.study_events import attached_log
from app.templating import PAGE_ROUTES, url
from ml.errors import PCBMError

router = APIRouter(route_class=PageRoute)

JOIN_CSRF_COOKIE = "pcbm_join_csrf"
VISIBLE_CHOICES = [("in_distribution", "the in-distribution split only"), ("all", "every split but the target"),
                   ("none", "no accuracy at all")]
DEFAULT_CONDITIONS = "with preview: weights, preview\nwithout preview: weights"


def _events(request: Request, ctx: AppContext):
    return attached_log(request.app.state, ctx.session_factory)


def _study_row(session, study: Study) -> dict[str, Any]:
    summary = studies.study_summary(session, study)
    return {"id": study.id, "name": study.name, "status": study.status.value, "base_model": summary["base_model"],
            "base_version": study.base_version, "participants": len(studies.participants(session, study.id)),
            "created_at": study.created_at, "conditions": [c["name"] for c in study.conditions]}


@router.get(PAGE_ROUTES["studies"], response_class=HTMLResponse)
def study_list(request: Request, user: PageUser, session: SessionDep) -> Response:
    """A researcher's studies (an admin's: all); participants go to their workspace."""
    if user.role == Role.PARTICIPANT:
        return redirect(url("participate"))
    rows = [_study_row(session, s) for s in studies.list_studies(session, user)]
    return render(request, "studies.html", {"studies": rows, "nav": "studies"})


def _model_choices(session) -> list[dict[str, Any]]:
    """Models a study can start from: with evaluation splits, and not a participant's copy."""
    copies = set(session.scalars(select(Participant.model_id).where(Participant.model_id.is_not(None))))
    choices = []
    for model in history.list_models(session):
        splits = studies.model_splits(session, model)
        if splits and model.id not in copies:
            choices.append({"id": model.id, "name": model.name, "version": model.head_number, "splits": splits})
    return choices


def _form_page(request: Request, session, form: dict[str, Any], error: str = "", status_code: int = 200) -> Response:
    return render(request, "study_new.html", {
        "models": _model_choices(session), "form": form, "error": error, "tools": list(TOOLS),
        "visible_choices": VISIBLE_CHOICES, "nav": "studies"}, status_code=status_code)


@router.get(PAGE_ROUTES["study_new"], response_class=HTMLResponse)
def new_study(request: Request, user: StaffUser, session: SessionDep) -> Response:
    """The form that sets up a study."""
    return _form_page(request, session, {"conditions": DEFAULT_CONDITIONS, "visible_splits": "in_distribution",
                                         "edit_budget": "5", "time_limit_min": "20"})


def _int_field(value: str, what: str, factor: int = 1) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    if not value.isdigit() or len(value) > 9:
        raise InvalidInput(f"{what} must be a whole number")
    return int(value) * factor


@router.post(PAGE_ROUTES["studies"], response_class=HTMLResponse)
def create_study(
    request: Request, user: StaffUser, session: SessionDep,
    name: Annotated[str, Form(max_length=128)] = "",
    base_model: Annotated[str, Form(max_length=12)] = "",
    task: Annotated[str, Form(max_length=5000)] = "",
    consent_text: Annotated[str, Form(max_length=20_000)] = "",
    visible_splits: Annotated[str, Form(max_length=32)] = "in_distribution",
    target_split: Annotated[str, Form(max_length=64)] = "",
    in_distribution_split: Annotated[str, Form(max_length=64)] = "",
    conditions: Annotated[str, Form(max_length=4000)] = "",
    edit_budget: Annotated[str, Form(max_length=12)] = "",
    time_limit_min: Annotated[str, Form(max_length=12)] = "",
) -> Response:
    """Create the study (in draft) and go to its dashboard; a refused form comes back with the reason."""
    form = {"name": name, "base_model": base_model, "task": task, "consent_text": consent_text,
            "visible_splits": visible_splits, "target_split": target_split,
            "in_distribution_split": in_distribution_split, "conditions": conditions, "edit_budget": edit_budget,
            "time_limit_min": time_limit_min}
    try:
        model_id = _int_field(base_model, "the base model")
        if model_id is None:
            raise InvalidInput("choose the base model")
        study = studies.create_study(
            session, user, name=name, base_model_id=model_id, task=task, consent_text=consent_text,
            visible_splits=visible_splits, target_split=target_split.strip() or None,
            in_distribution_split=in_distribution_split.strip() or None,
            conditions=studies.parse_conditions_text(conditions) or None,
            edit_budget=_int_field(edit_budget, "the edit budget"),
            time_limit_s=_int_field(time_limit_min, "the time limit", 60))
    except AppError as exc:
        session.rollback()
        return _form_page(request, session, form, exc.message, exc.status_code)
    return redirect(url("study", study=study.id), flash=("success", f"Study “{study.name}” created as a draft."))


def _results_view(session, ctx: AppContext, study: Study) -> tuple[dict[str, Any] | None, str]:
    if ctx.models is None:
        return None, "this server has no model service, so accuracies cannot be computed"
    try:
        results = study_analysis.study_results(session, ctx.models, ctx.artifacts, study)
    except (AppError, PCBMError) as exc:
        return None, getattr(exc, "message", None) or str(exc)
    values = [(name, c["values"]) for name, c in results["conditions"].items()]
    references = [("base", results["base"]["accuracy"]), ("random", results["random"]["mean"]),
                  ("oracle", results["oracle"]["accuracy"])]
    results["chart"] = plots.strip_plot(values, f"Held-out accuracy ({study.target_split}) per condition",
                                        [(n, v) for n, v in references if v is not None])
    results["submissions"] = [p for p in results["participants"] if p["submitted"]]
    return results, ""


def dashboard(request: Request, session, ctx: AppContext, study: Study, links: list[str] | None = None,
              status_code: int = 200) -> Response:
    _events(request, ctx).flush(timeout_s=2)
    summary = studies.study_summary(session, study)
    results, problem = _results_view(session, ctx, study)
    return render(request, "study.html", {
        "study": summary, "progress": study_analysis.progress(session, ctx.artifacts, study),
        "results": results, "results_problem": problem, "invitation_links": links or [], "nav": "studies",
        "exports": {fmt: f"/api/v1/studies/{study.id}/export?format={fmt}" for fmt in ("csv", "parquet", "json")},
    }, status_code=status_code)


@router.get(PAGE_ROUTES["study"], response_class=HTMLResponse)
def study_page(request: Request, study: int, user: StaffUser, session: SessionDep, ctx: ContextDep) -> Response:
    """The dashboard: configuration, participants' progress, results against the baselines, export."""
    return dashboard(request, session, ctx, studies.get_study(session, user, study))


@router.post(PAGE_ROUTES["study_status"], response_class=HTMLResponse)
def change_status(request: Request, study: int, user: StaffUser, session: SessionDep, ctx: ContextDep,
                  action: Annotated[str, Form(max_length=8)]) -> Response:
    """Open a draft study, or close (freeze) it."""
    if action == "open":
        found = studies.open_study(session, user, study)
        message = "The study is open: invitations work now."
    elif action == "close":
        found = studies.close_study(session, user, study)
        _events(request, ctx).flush()
        message = "The study is closed: nothing can change any more."
    else:
        raise InvalidInput("the action must be open or close")
    return redirect(url("study", study=found.id), flash=("success", message))


@router.post(PAGE_ROUTES["study_invite"], response_class=HTMLResponse)
def invite(request: Request, study: int, user: StaffUser, session: SessionDep, ctx: ContextDep,
           count: Annotated[int, Form(ge=1, le=studies.MAX_INVITATIONS)]) -> Response:
    """Make single-use invitation links; they are shown on this page only, once."""
    codes = studies.create_invitations(session, user, study, count)
    base = str(request.base_url).rstrip("/")
    found = studies.get_study(session, user, study)
    return dashboard(request, session, ctx, found, links=[base + studies.join_path(c) for c in codes])


# -- joining ---------------------------------------------------------------------------------------

def _join_page(request: Request, study: Study | None, code: str, error: str = "", status_code: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    context = {"csrf_token": token, "code": code, "error": error,
               "study": {"name": study.name, "consent_text": study.consent_text,
                         "time_limit_s": study.time_limit_s, "edit_budget": study.edit_budget} if study else None}
    response = render(request, "study_join.html", context, status_code=status_code)
    response.set_cookie(JOIN_CSRF_COOKIE, token, max_age=2 * 3600, path=url("study_join"), httponly=True,
                        samesite="strict")
    response.headers["Referrer-Policy"] = "no-referrer"  # keep the code out of Referer headers
    return response


@router.get(PAGE_ROUTES["study_join"], response_class=HTMLResponse)
def join_form(request: Request, session: SessionDep,
              code: Annotated[str, Query(max_length=128)] = "") -> Response:
    """The invitation page: what the study is, its consent text, and a button to take part."""
    try:
        study = studies.study_for_code(session, code)
    except AppError as exc:
        return _join_page(request, None, "", exc.message, exc.status_code)
    return _join_page(request, study, code)


@router.post(PAGE_ROUTES["study_join"], response_class=HTMLResponse)
def join(request: Request, session: SessionDep, ctx: ContextDep,
         code: Annotated[str, Form(max_length=128)] = "", consent: Annotated[str, Form(max_length=8)] = "",
         csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    """Spend the invitation: a pseudonymous participant with their own model, signed in to the workspace."""
    if not csrf_matches(request.cookies.get(JOIN_CSRF_COOKIE, ""), csrf_token):
        return _join_page(request, None, "", "This page has expired; open your invitation link again.", 403)
    try:
        _, user = studies.join(session, ctx.artifacts, code, consent=consent == "yes")
    except AppError as exc:
        session.rollback()
        study = None
        if isinstance(exc, InvalidInput):
            try:
                study = studies.study_for_code(session, code)
            except AppError:
                pass
        return _join_page(request, study, code if study else "", exc.message, exc.status_code)
    response = redirect(url("participate"))
    start_browser_session(request, response, ctx, user)
    set_flash(response, "success", "Welcome! You are taking part as " + user.name.split("-", 1)[-1] + ".")
    response.delete_cookie(JOIN_CSRF_COOKIE, path=url("study_join"), httponly=True, samesite="strict")
    return response

