"""The list of models, and the nav entries that need a model (they go to the first one)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import ContextDep, SessionDep
from app.routes.pages.common import PageRoute, PageUser, StaffUser, is_staff, redirect, render
from app.routes.pages.views import model_header, split_order
from app.services import history, inspect
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)


def model_rows(session, ctx) -> list[dict]:
    """home.html's rows from ``inspect.model_summary`` (what the JSON API reports of each model)."""
    rows = []
    for model in history.list_models(session):
        summary = inspect.model_summary(ctx.models, session, model.id)
        accuracy = {split: value for split, value in summary["accuracy"].items() if value is not None}
        rows.append({"name": summary["name"], "backbone": summary["backbone"]["spec"],
                     "dataset": summary["dataset"]["name"], "bank": summary["bank"]["name"],
                     "version": summary["version"], "accuracy": accuracy, "updated_at": summary["updated_at"]})
    return rows


@router.get(PAGE_ROUTES["home"], response_class=HTMLResponse)
def home(request: Request, user: PageUser, session: SessionDep, ctx: ContextDep) -> Response:
    """Every model with what it is built from, its current version and its accuracy per split."""
    messages = []
    rows: list[dict] = []
    if is_staff(user):
        rows = model_rows(session, ctx) if ctx.models is not None else [
            {**model_header(m), "accuracy": {}} for m in history.list_models(session)]
    else:
        messages.append({"level": "info", "text": "Participants work on models through their studies."})
    splits = split_order(name for row in rows for name in row["accuracy"])
    return render(request, "home.html", {"models": rows, "splits": splits, "nav": "models"}, messages=messages)


def _first_model_page(session, page: str) -> Response:
    models = history.list_models(session)
    if not models:
        return redirect(url("home"), flash=("info", "There are no models yet."))
    return redirect(url(page, model=models[0].name))


@router.get(PAGE_ROUTES["images_index"], response_class=HTMLResponse)
def images_index(user: StaffUser, session: SessionDep) -> Response:
    """The Images nav entry outside a model: the first model's images."""
    return _first_model_page(session, "images")


@router.get(PAGE_ROUTES["concepts_index"], response_class=HTMLResponse)
def concepts_index(user: StaffUser, session: SessionDep) -> Response:
    """The Concepts nav entry outside a model: the first model's concept bank."""
    return _first_model_page(session, "bank")
