"""Explain your own image: a multipart upload, decoded and explained, never stored or echoed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import HTMLResponse, Response

from app import plots
from app.deps import ContextDep, SessionDep
from app.errors import AppError
from app.models import Model
from app.routes.pages.common import PageRoute, StaffUser, find_model, render
from app.routes.pages.model import service
from app.services import inspect
from app.templating import PAGE_ROUTES
from ml.errors import PCBMError

router = APIRouter(route_class=PageRoute)

WATERFALL_TOP = 10


def _upload_page(request: Request, ctx, model: Model, *, status_code: int = 200, error: str = "",
                 result: dict[str, Any] | None = None) -> Response:
    max_mb = round(ctx.settings.max_upload_bytes / (1024 * 1024), 1)
    return render(request, "upload.html", {"model": {"name": model.name}, "max_mb": max_mb, "error": error,
                                           "result": result, "nav": "images"}, status_code=status_code)


def result_view(result: dict[str, Any]) -> dict[str, Any]:
    """upload.html's ``result`` from ``inspect.predict_upload``."""
    steps = [(c["concept"], c["contribution"]) for c in result["contributions"]]
    other = result["logit"] - result["bias"] - sum(v for _, v in steps)  # concepts beyond the top, residual
    if abs(other) > 1e-6:
        steps.append(("other concepts and residual", other))
    return {
        "predicted": result["predicted"], "confidence": result["confidence"],
        "width": result["width"], "height": result["height"],
        "probabilities": [{"name": p["class_name"], "prob": p["probability"]} for p in result["probabilities"]],
        "waterfall_chart": plots.waterfall(steps, result["bias"], result["explained_class"]),
    }


@router.get(PAGE_ROUTES["upload"], response_class=HTMLResponse)
def upload_form(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep) -> Response:
    """The upload form."""
    return _upload_page(request, ctx, find_model(session, model))


@router.post(PAGE_ROUTES["upload"], response_class=HTMLResponse)
async def upload(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
                 image: Annotated[UploadFile | None, File()] = None) -> Response:
    """Explain an uploaded PNG or JPEG; a refused file is named on the page, its bytes never shown."""
    from starlette.concurrency import run_in_threadpool

    found = await run_in_threadpool(find_model, session, model)
    if image is None:
        return _upload_page(request, ctx, found, status_code=422, error="Choose an image file to explain.")
    data = await image.read()
    try:
        result = await run_in_threadpool(inspect.predict_upload, service(ctx), found.id, data, WATERFALL_TOP)
    except AppError as exc:
        return _upload_page(request, ctx, found, status_code=exc.status_code, error=exc.message[:1].upper()
                            + exc.message[1:] + ".")
    except PCBMError as exc:
        return _upload_page(request, ctx, found, status_code=422, error=str(exc))
    return _upload_page(request, ctx, found, result=result_view(result))
