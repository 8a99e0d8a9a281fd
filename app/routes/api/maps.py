"""Concept maps (dataset images and uploads) and concept metrics of served models.

Plain ``def`` handlers: FastAPI runs them in its threadpool, and the backbone pass runs
under the inference limit (503 with Retry-After when saturated). Concept metrics are
computed in the background; the endpoint answers at once with 202 while they run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Query, Response, UploadFile
from fastapi.responses import JSONResponse

from app.deps import ContextDep, ResearcherUser
from app.errors import InvalidInput, Unavailable
from app.schemas import ErrorBody
from app.services.maps import colour_only_png, map_service, requested

router = APIRouter(prefix="/models", tags=["concept maps"])

_png_or_json = {200: {"content": {"image/png": {}, "application/json": {}},
                      "description": "The map over the image (PNG), or the maps as arrays (JSON)"},
                400: {"model": ErrorBody, "description": "The image id tries to leave the dataset folder"},
                422: {"model": ErrorBody, "description": "Unknown concept or class (named in the message)"},
                503: {"model": ErrorBody, "description": "Every inference slot is busy; retry after `Retry-After`"}}
Concepts = Annotated[list[str] | None, Query(max_length=256, description="Concept names (repeat, or comma-separated).")]
Classes = Annotated[list[str] | None, Query(alias="class", max_length=256, description="Class names: class maps.")]
Method = Annotated[str | None, Query(max_length=64, description="Map method, e.g. 'maskclip+softmax' "
                                                                 "(default: the architecture's).")]
Format = Literal["json", "png"]
Resolution = Literal["image", "grid"]


def _service(ctx):
    if ctx.models is None:
        raise Unavailable("this server runs without a model service")
    return map_service(ctx.models)


def _one(result: dict[str, Any]):
    if len(result["maps"]) != 1:
        raise InvalidInput("format=png draws one map: name one concept or one class (or ask for format=json)")
    kind, _, grid = result["maps"][0]
    return kind, grid


def _png(data: bytes, result: dict[str, Any]) -> Response:
    return Response(data, media_type="image/png", headers={
        "Cache-Control": "private, max-age=300", "Content-Disposition": "inline",
        "Content-Security-Policy": "default-src 'none'", "X-Map-Method": result["method"]})


@router.get("/{model_id}/images/maps", response_class=Response, responses=_png_or_json)
def image_maps(
    model_id: int, user: ResearcherUser, ctx: ContextDep,
    id: Annotated[str, Query(min_length=1, max_length=1024, description="Image path relative to the dataset root.")],
    concepts: Concepts = None, class_name: Classes = None, method: Method = None, format: Format = "json",
    resolution: Resolution = "image",
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="PNG only: weight of the map over the image.")] = 0.5,
    size: Annotated[int, Query(ge=16, le=1024, description="PNG only: side of the picture.")] = 320,
) -> Response:
    """Concept (``concepts=``) and class (``class=``) maps of a dataset image: arrays, or one map
    over the image as PNG (concepts on their own range, classes diverging about zero)."""
    service = _service(ctx)
    entry = service.models.get(model_id)
    image = service.image(entry, id)
    result = service.maps(entry, image, requested(concepts, entry.concept_names),
                          requested(class_name, entry.classes), method)
    if format == "png":
        kind, grid = _one(result)
        return _png(service.overlay_png(image, kind, grid, opacity, size, result["method"]), result)
    return JSONResponse({"model_id": entry.model_id, "version": entry.version, "image_id": id,
                         **service.as_json(result, resolution)})


@router.post("/{model_id}/maps", response_class=Response, responses={
    **_png_or_json, 413: {"model": ErrorBody}, 415: {"model": ErrorBody}})
def upload_maps(
    model_id: int, user: ResearcherUser, ctx: ContextDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG, WEBP, BMP or GIF.")],
    concepts: Concepts = None, class_name: Classes = None, method: Method = None, format: Format = "json",
    resolution: Resolution = "image",
    size: Annotated[int, Query(ge=16, le=1024, description="PNG only: side of the picture.")] = 320,
) -> Response:
    """Maps of an uploaded image. The upload is neither stored nor sent back: the PNG answer is
    the coloured map alone, over the square the model sees (centre crop)."""
    service = _service(ctx)
    entry = service.models.get(model_id)
    decoded = service.upload(image.file.read())
    result = service.maps(entry, decoded, requested(concepts, entry.concept_names),
                          requested(class_name, entry.classes), method)
    if format == "png":
        kind, grid = _one(result)
        return _png(colour_only_png(kind, grid, size, service, result["method"]), result)
    return JSONResponse({"model_id": entry.model_id, "version": entry.version, "image_id": None,
                         "width": decoded.width, "height": decoded.height, **service.as_json(result, resolution)})


_METRICS_STATUS = {"content": {"application/json": {"schema": {  # the report's own fields vary by status
    "type": "object", "required": ["status"],
    "properties": {"status": {"enum": ["ready", "running", "unavailable", "failed"]}}}}}}


@router.get("/{model_id}/concept-metrics", responses={
    200: {"description": "status ready (the report) or unavailable (no annotations: the reason)", **_METRICS_STATUS},
    202: {"description": "status running: computing in the background, ask again", **_METRICS_STATUS}})
def concept_metrics(
    model_id: int, user: ResearcherUser, ctx: ContextDep,
    split: Annotated[str | None, Query(max_length=64, description="Default: test, else the first split.")] = None,
    method: Method = None,
    l: Annotated[int, Query(ge=1, le=100, description="How many top concepts CEM@l and CLM@l look at.")] = 5,
    wait: Annotated[float, Query(ge=0.0, le=30.0, description="Seconds to wait for a running computation.")] = 0.0,
) -> JSONResponse:
    """Pointing game, IoU, mass in mask, existence (CEM@l), location (CLM@l) and CGIM of the
    model's current version on an annotated split, per concept too. Never blocks: 202 while
    the maps are computed in the background (``progress`` 0..1), then 200."""
    result = _service(ctx).metrics(model_id, split, method, l=l, wait_s=wait)
    status = 202 if result["status"] == "running" else 200
    headers = {"Retry-After": "2"} if status == 202 else {}
    return JSONResponse(result, status_code=status, headers=headers)


__all__ = ["router"]
