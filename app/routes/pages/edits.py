"""Editing a model from its page: preview pending edits, commit them, undo the last version."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from app.context import AppContext
from app.deps import ContextDep, SessionDep
from app.errors import AppError, InvalidInput, VersionConflict
from app.models import Model
from app.routes.pages import model as model_pages
from app.routes.pages.common import PageRoute, StaffUser, find_model, is_htmx, redirect, render_fragment
from app.routes.pages.history import conflict_message
from app.routes.pages.views import edits_json
from app.schemas import EditOp
from app.services import history, inspect
from app.templating import PAGE_ROUTES, url
from ml.errors import PCBMError

router = APIRouter(route_class=PageRoute)

MAX_EDITS = 200


def parse_edits(raw: str) -> list[dict[str, Any]]:
    """The pending edits a form carries as JSON, checked like the API's ``EditOp`` bodies."""
    try:
        data = json.loads(raw or "[]")
    except ValueError:
        raise InvalidInput("the pending edits are not valid JSON; reload the page and start again") from None
    if not isinstance(data, list):
        raise InvalidInput("the pending edits must be a list")
    if len(data) > MAX_EDITS:
        raise InvalidInput(f"too many pending edits (at most {MAX_EDITS}); commit some first")
    edits = []
    for item in data:
        try:
            edits.append(EditOp.model_validate(item).model_dump(exclude_none=True))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidInput(f"a pending edit is not valid: {where}: {first.get('msg', '')}") from None
    return edits


def _new_edit(op: str, concept: str, class_name: str | None) -> dict[str, Any]:
    edit = {"op": op, "concept": concept, "source": "user"}
    if class_name:
        edit["class_name"] = class_name
    return edit


def _same_target(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["op"] == b["op"] and a["concept"] == b["concept"] and a.get("class_name") == b.get("class_name")


def pending_with(edits: list[dict[str, Any]], prune_class: str, prune_all: str, class_name: str) -> list[dict]:
    """``edits`` plus the prune the user just clicked (clicking the same prune twice adds it once)."""
    new = []
    if prune_class:
        if not class_name:
            raise InvalidInput("pick a class to prune the concept for")
        new.append(_new_edit("prune", prune_class, class_name))
    if prune_all:
        new.append(_new_edit("prune", prune_all, None))
    for edit in new:
        if not any(_same_target(edit, old) for old in edits):
            edits = [*edits, edit]
    return edits


def preview_view(ctx: AppContext, model: Model, edits: list[dict[str, Any]], base_version: int) -> dict[str, Any]:
    """_preview.html's ``preview`` from ``inspect.preview`` (the numbers the JSON API returns), made
    with the editor commits use, so what is previewed is what gets committed."""
    if not edits:
        return {"edits": [], "edits_json": "[]", "base_version": base_version, "splits": []}
    result = inspect.preview(model_pages.service(ctx), model.id, edits, base_version=base_version,
                             editor=ctx.head_editor)
    return model_pages.preview_context(result, base_version)


def _refused_preview(edits: list[dict[str, Any]], base_version: int, error: str) -> dict[str, Any]:
    """A preview that could not be made: the reason, and the edits that were pending before."""
    return {"edits": [], "edits_json": edits_json(edits), "base_version": base_version, "splits": [],
            "error": error}


@router.post(PAGE_ROUTES["preview"], response_class=HTMLResponse)
def preview(
    request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
    base_version: Annotated[int, Form(ge=1)],
    edits: Annotated[str, Form(max_length=200_000)] = "[]",
    prune_class: Annotated[str, Form(max_length=256)] = "",
    prune_all: Annotated[str, Form(max_length=256)] = "",
    class_name: Annotated[str, Form(alias="class", max_length=256)] = "",
) -> Response:
    """What the pending edits plus the clicked prune would do on every split; nothing is saved.

    With htmx the answer is _preview.html, swapped into the page; without it, the whole
    model page with the preview filled in. A refused preview (unknown concept, a model that
    moved on) says why in the preview panel.
    """
    found = find_model(session, model)
    before = parse_edits(edits)
    pending = pending_with(before, prune_class.strip(), prune_all.strip(), class_name.strip())
    status = 200
    try:
        view = preview_view(ctx, found, pending, base_version)
    except VersionConflict as exc:
        view, status = _refused_preview([], found.head_number, conflict_message(exc, "preview")), 409
    except AppError as exc:  # unknown concept or class (422), model not servable, overloaded (503)
        view, status = _refused_preview(before, base_version, exc.message), exc.status_code
    except PCBMError as exc:
        view, status = _refused_preview(before, base_version, str(exc)), 422
    if is_htmx(request):
        # htmx swaps only 2xx answers; the panel itself says what went wrong.
        return render_fragment(request, "_preview.html", {"model": {"name": found.name}, "preview": view})
    return model_pages.model_page(request, session, ctx, found, class_name=class_name or None, preview=view,
                                  status_code=status)


@router.post(PAGE_ROUTES["commit"], response_class=HTMLResponse)
def commit(
    request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
    base_version: Annotated[int, Form(ge=1)],
    edits: Annotated[str, Form(max_length=200_000)],
    message: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Save the previewed edits as a new version made on ``base_version``.

    A stale ``base_version`` re-renders the model page (409) saying who moved it on; the
    edits stay pending so they can be previewed again on the new version.
    """
    found = find_model(session, model)
    pending = parse_edits(edits)
    if not pending:
        raise InvalidInput("there is nothing to commit: prune a concept first")
    try:
        svc = getattr(ctx, "models", None)  # without a model service the version just has no metrics
        metrics = inspect.edit_metrics(svc, found.id, pending, base_version,
                                       editor=ctx.head_editor) if svc is not None else None
        created = history.commit_edit(session, ctx.artifacts, found.id, base_version, pending, author=user,
                                      editor=ctx.head_editor, message=message.strip(), metrics=metrics)
    except VersionConflict as exc:
        session.rollback()
        return model_pages.model_page(
            request, session, ctx, found, pending_edits=pending, status_code=409,
            messages=[{"level": "error", "text": conflict_message(exc, "edit")}])
    return redirect(url("model", model=found.name), flash=("success", f"Saved as version {created.number}."))


@router.post(PAGE_ROUTES["undo"], response_class=HTMLResponse)
def undo(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
         base_version: Annotated[int, Form(ge=1)]) -> Response:
    """Append a version with the weights the current version's parent had."""
    found = find_model(session, model)
    try:
        created = history.undo(session, ctx.artifacts, found.id, base_version, author=user)
    except VersionConflict as exc:
        session.rollback()
        return model_pages.model_page(request, session, ctx, found, status_code=409,
                                      messages=[{"level": "error", "text": conflict_message(exc, "undo")}])
    except InvalidInput as exc:
        session.rollback()
        return model_pages.model_page(request, session, ctx, found, status_code=422,
                                      messages=[{"level": "error", "text": exc.message}])
    restored = created.edit.get("restored")
    return redirect(url("model", model=found.name),
                    flash=("success", f"Undid version {base_version}: version {created.number} has the weights "
                                      f"of v{restored}."))
