"""A job's progress page and the fragment that polls itself until the job ends."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import SessionDep
from app.models import Job
from app.routes.pages.common import PageRoute, PageUser, redirect, render, render_fragment, safe_next
from app.services import jobs as job_service
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)

_TITLES = {"embed": "Embedding a dataset", "train": "Training a head", "cav": "Learning concepts",
           "import": "Importing a workspace"}


def job_view(job: Job) -> dict[str, Any]:
    """job.html's ``job``: status, progress, the current stage, and a local link to the result."""
    result = job.result or {}
    params = job.params or {}
    result_url = result.get("url") if isinstance(result.get("url"), str) else ""
    title = params.get("title") if isinstance(params.get("title"), str) else None
    return {
        "id": job.id,
        "kind": job.kind,
        "title": title or _TITLES.get(job.kind, f"Job {job.id}: {job.kind}"),
        "status": job.status.value,
        "progress": job.progress,
        "done": result.get("done") if isinstance(result.get("done"), int) else None,
        "total": result.get("total") if isinstance(result.get("total"), int) else None,
        "message": job.stage or "",
        "error": job.error or "",
        "result_url": safe_next(result_url) or "",
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }


@router.get(PAGE_ROUTES["jobs"], response_class=HTMLResponse)
def jobs_index(user: PageUser, session: SessionDep) -> Response:
    """The Jobs nav entry: the newest job this user may see."""
    newest = job_service.list_jobs(session, viewer=user, limit=1)
    if not newest:
        return redirect(url("home"), flash=("info", "No jobs have run yet."))
    return redirect(url("job", job=newest[0].id))


@router.get(PAGE_ROUTES["job"], response_class=HTMLResponse)
def job_page(request: Request, job: int, user: PageUser, session: SessionDep) -> Response:
    """One job; the progress bar polls itself while the job is queued or running."""
    found = job_service.get_job(session, job, viewer=user)
    return render(request, "job.html", {"job": job_view(found), "nav": "jobs"})


@router.get(PAGE_ROUTES["job_progress"], response_class=HTMLResponse)
def job_progress(request: Request, job: int, user: PageUser, session: SessionDep) -> Response:
    """_job_progress.html alone: what the page's progress bar swaps in every second."""
    found = job_service.get_job(session, job, viewer=user)
    return render_fragment(request, "_job_progress.html", {"job": job_view(found)})
