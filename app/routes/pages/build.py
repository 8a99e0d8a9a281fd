"""The Build page: embed a dataset, build a concept bank and train a model, each as a job.

The forms post the same requests as ``POST /api/v1/datasets``, ``/banks`` and ``/models`` and
go to the job's progress page; a refused form comes back with the reason and the values.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from app.context import AppContext
from app.deps import ContextDep, SessionDep
from app.errors import AppError, InvalidInput
from app.routes.pages.common import PageRoute, StaffUser, redirect, render
from app.services import build_jobs
from app.services import jobs as job_service
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)

Short = Annotated[str, Form(max_length=64)]
Long = Annotated[str, Form(max_length=1024)]


def _page(request: Request, session: Session, ctx: AppContext, user: Any, *, form: dict[str, str] | None = None,
          which: str = "", error: str = "", status_code: int = 200) -> Response:
    backbone = build_jobs.served_workspace(ctx).backbone  # None until the first dataset is embedded
    recent = [j for j in job_service.list_jobs(session, viewer=user, limit=20) if j.kind in build_jobs.KINDS]
    return render(request, "build.html", {
        "nav": "build", "datasets": build_jobs.list_datasets(ctx), "banks": build_jobs.list_banks(ctx),
        "backbone": backbone, "data_root": str(ctx.settings.data_root_path), "form": form or {}, "which": which,
        "error": error, "jobs": [{"id": j.id, "title": (j.params or {}).get("title") or j.kind,
                                  "status": j.status.value, "progress": j.progress} for j in recent[:8]],
    }, status_code=status_code)


@router.get(PAGE_ROUTES["build"], response_class=HTMLResponse)
def build_page(request: Request, user: StaffUser, session: SessionDep, ctx: ContextDep) -> Response:
    return _page(request, session, ctx, user)


def _queued(job) -> Response:
    return redirect(url("job", job=job.id), flash=("success", f"Job {job.id} queued: {job.params.get('title')}."))


@router.post(PAGE_ROUTES["build_dataset"], response_class=HTMLResponse)
def build_dataset(request: Request, user: StaffUser, session: SessionDep, ctx: ContextDep,
                  name: Short = "", path: Long = "", backbone: Long = "") -> Response:
    try:
        job = build_jobs.request_embed(session, ctx, user, name=name.strip(), path=path.strip(),
                                       backbone=backbone.strip() or None)
    except AppError as exc:
        session.rollback()
        return _page(request, session, ctx, user, form={"name": name, "path": path, "backbone": backbone},
                     which="dataset", error=exc.message, status_code=exc.status_code)
    return _queued(job)


@router.post(PAGE_ROUTES["build_bank"], response_class=HTMLResponse)
def build_bank(request: Request, user: StaffUser, session: SessionDep, ctx: ContextDep,
               name: Short = "", kind: Short = "text",
               phrases: Annotated[str, Form(max_length=100_000)] = "", examples: Long = "") -> Response:
    try:
        job = build_jobs.request_bank(session, ctx, user, name=name.strip(), kind=kind,
                                      phrases=[p for p in phrases.splitlines() if p.strip()],
                                      examples=examples.strip() or None)
    except AppError as exc:
        session.rollback()
        return _page(request, session, ctx, user, form={"bank_name": name, "kind": kind, "phrases": phrases,
                                                        "examples": examples},
                     which="bank", error=exc.message, status_code=exc.status_code)
    return _queued(job)


@router.post(PAGE_ROUTES["build_model"], response_class=HTMLResponse)
def build_model(request: Request, user: StaffUser, session: SessionDep, ctx: ContextDep,
                name: Short = "", embeddings: Short = "", bank: Short = "", hybrid: Short = "",
                lam: Short = "") -> Response:
    form = {"model_name": name, "embeddings": embeddings, "bank": bank, "hybrid": hybrid, "lam": lam}
    try:
        try:
            chosen_lam = float(lam) if lam.strip() else None
        except ValueError:
            raise InvalidInput(f"λ must be a number, not {lam!r}") from None
        if chosen_lam is not None and not 0 < chosen_lam <= 10:
            raise InvalidInput("λ must be above 0 and at most 10")
        job = build_jobs.request_train(session, ctx, user, name=name.strip(), embeddings=embeddings, bank=bank,
                                       hybrid=hybrid == "on", lam=chosen_lam)
    except AppError as exc:
        session.rollback()
        return _page(request, session, ctx, user, form=form, which="model", error=exc.message,
                     status_code=exc.status_code)
    return _queued(job)
