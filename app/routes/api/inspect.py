"""Inspecting served models: concept weights, the head matrix, edit previews, images, uploads.

Researchers and admins, like the other model endpoints. Handlers are plain ``def``s, so
FastAPI runs them in its threadpool: tensor work and backbone passes never block the loop.
``predict`` is the exception: it awaits its micro-batch without holding a thread.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.context import AppContext
from app.deps import ContextDep, ResearcherUser, SessionDep
from app.errors import Unavailable
from app.schemas import (
    ConceptWeightsPublic,
    ErrorBody,
    HeadMatrixPublic,
    ImageDetailPublic,
    ImagePagePublic,
    PreviewPublic,
    PreviewRequest,
    UploadPredictionPublic,
    WhatIfPublic,
    WhatIfRequest,
)
from app.services import inspect
from app.services.model_service import ModelService

router = APIRouter(prefix="/models", tags=["inspect"])

_busy = {503: {"model": ErrorBody, "description": "Every slot is busy; retry after `Retry-After` seconds"}}
_conflict = {409: {"model": ErrorBody, "description": "base_version is not the head; detail.current_version is"}}
_bad_id = {400: {"model": ErrorBody, "description": "The image id tries to leave the dataset folder"}}
_bad_image = {status: {"model": ErrorBody} for status in (400, 413, 415)}

ClassQuery = Annotated[str | None, Query(alias="class", max_length=256, description="A class name.")]
ImageId = Annotated[str, Query(min_length=1, max_length=1024, description="Image path relative to the dataset root.")]


def _models(ctx: AppContext) -> ModelService:
    if ctx.models is None:
        raise Unavailable("this server runs without a model service")
    return ctx.models


@router.get("/{model_id}/concepts", response_model=ConceptWeightsPublic)
def concept_weights(
    model_id: int, user: ResearcherUser, ctx: ContextDep, class_name: ClassQuery = None,
    q: Annotated[str | None, Query(max_length=256, description="Keep concepts whose name contains this.")] = None,
    sort: Literal["abs", "weight", "max_abs_weight", "name", "quality", "index"] = "abs",
    order: Literal["asc", "desc"] = "desc",
    limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> ConceptWeightsPublic:
    """Each concept's weight for one class (or every class), its max |weight| and quality."""
    return ConceptWeightsPublic.model_validate(
        inspect.concept_weights(_models(ctx), model_id, class_name, q, sort, order, limit))


@router.get("/{model_id}/matrix", response_model=HeadMatrixPublic)
def head_matrix(model_id: int, user: ResearcherUser, ctx: ContextDep) -> HeadMatrixPublic:
    """The head's weights, classes x concepts."""
    return HeadMatrixPublic.model_validate(inspect.head_matrix(_models(ctx), model_id))


@router.post("/{model_id}/preview", response_model=PreviewPublic, responses={**_conflict, **_busy})
def preview(model_id: int, body: PreviewRequest, user: ResearcherUser, ctx: ContextDep) -> PreviewPublic:
    """What the edits would do on every split, before committing them; nothing is saved."""
    result = inspect.preview(_models(ctx), model_id, [e.model_dump() for e in body.edits], body.base_version,
                             editor=ctx.head_editor)
    return PreviewPublic.model_validate(result)


@router.get("/{model_id}/images", response_model=ImagePagePublic)
def browse_images(
    model_id: int, user: ResearcherUser, ctx: ContextDep,
    split: Annotated[str | None, Query(max_length=64, description="Default: test, else the first split.")] = None,
    label: Annotated[str | None, Query(max_length=256)] = None,
    predicted: Annotated[str | None, Query(max_length=256)] = None,
    correct: bool | None = None,
    group: Annotated[str | None, Query(max_length=256)] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=inspect.MAX_PER_PAGE)] = 48,
) -> ImagePagePublic:
    """A page of one split's images with the current head's predictions."""
    return ImagePagePublic.model_validate(inspect.browse_images(
        _models(ctx), model_id, split, label, predicted, correct, group, page, per_page))


@router.get("/{model_id}/images/detail", response_model=ImageDetailPublic, responses=_bad_id)
def image_detail(model_id: int, id: ImageId, user: ResearcherUser, ctx: ContextDep,
                 class_name: ClassQuery = None) -> ImageDetailPublic:
    """One image: prediction, probabilities, concept scores, contributions to a class (default: predicted)."""
    return ImageDetailPublic.model_validate(inspect.image_detail(_models(ctx), model_id, id, class_name))


@router.get("/{model_id}/images/file", response_class=Response, responses={
    200: {"content": {"image/png": {}}, "description": "The image, re-encoded as PNG"}, **_bad_id})
def image_file(model_id: int, id: ImageId, user: ResearcherUser, ctx: ContextDep,
               size: Annotated[int | None, Query(ge=16, le=4096, description="Shrink to fit this side.")] = None,
               ) -> Response:
    """The dataset image, decoded and re-encoded as PNG."""
    content, media_type = inspect.image_file(_models(ctx), model_id, id, size)
    return Response(content, media_type=media_type,
                    headers={"Cache-Control": "private, max-age=300", "Content-Disposition": "inline"})


@router.post("/{model_id}/images/whatif", response_model=WhatIfPublic, responses=_bad_id)
def whatif(model_id: int, body: WhatIfRequest, user: ResearcherUser, ctx: ContextDep) -> WhatIfPublic:
    """The prediction if one concept's score of this image were different (nothing is saved)."""
    return WhatIfPublic.model_validate(inspect.whatif(_models(ctx), model_id, body.id, body.concept, body.score))


def _release_and_submit(session: Session, svc: ModelService, model_id: int, data: bytes,
                        top: int) -> inspect.PendingPrediction:
    # Authentication is done: hand its pooled database connection back before waiting for a
    # batch, or a few dozen waiting uploads would hold every connection the pool has.
    session.close()
    return inspect.submit_upload(svc, model_id, data, top)


@router.post("/{model_id}/predict", response_model=UploadPredictionPublic, responses={**_bad_image, **_busy})
async def predict(model_id: int, user: ResearcherUser, ctx: ContextDep, session: SessionDep,
                  image: Annotated[UploadFile, File(description="PNG, JPEG, WEBP, BMP or GIF.")],
                  top: Annotated[int, Query(ge=1, le=1000)] = 10) -> UploadPredictionPublic:
    """Classify an uploaded image and explain it; the upload is neither stored nor sent back.

    Concurrent uploads share backbone passes (micro-batching, ``PCBM_PREDICT_*`` settings).
    Waiting for the batch holds no thread: decoding and the explanation run in the
    threadpool, the forward pass on the batcher's thread, and this coroutine only awaits.
    """
    svc = _models(ctx)
    data = await image.read()
    pending = await run_in_threadpool(_release_and_submit, session, svc, model_id, data, top)
    embedding = await asyncio.wrap_future(pending.embedding)
    return UploadPredictionPublic.model_validate(await run_in_threadpool(inspect.finish_upload, pending, embedding))
