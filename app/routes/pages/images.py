"""A model's images: the filtered grid, one image explained, its file, concept maps and what-ifs."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from app import plots
from app.deps import ContextDep, SessionDep
from app.errors import AppError, InvalidInput
from app.models import Model
from app.routes.pages.common import PageRoute, StaffUser, find_model, is_htmx, render, render_fragment
from app.routes.pages.model import service
from app.services import inspect
from app.services.maps import map_service
from app.templating import PAGE_ROUTES, url
from ml.errors import PCBMError

router = APIRouter(route_class=PageRoute)

PER_PAGE = 48
WATERFALL_TOP = 12
THUMB_SIZES = (96, 160, 320, 640)
OVERLAY_SIZE = 320
MAPS_UNAVAILABLE = "Concept maps are unavailable for this model ({reason}); this shows the image itself."

Text = Annotated[str | None, Query(max_length=1024)]


# ---------------------------------------------------------------- the grid
def _filters(split: str | None, label: str | None, predicted: str | None, correct: str | None,
             group: str | None) -> dict[str, str]:
    return {"split": (split or "").strip(), "label": (label or "").strip(), "predicted": (predicted or "").strip(),
            "correct": correct if correct in ("yes", "no") else "", "group": (group or "").strip()}


def _page_number(value: str | None) -> int:
    value = (value or "").strip()
    return min(int(value), 10**6) if value.isdigit() and int(value) >= 1 else 1


def grid_view(svc: Any, model: Model, filters: dict[str, str], page: int) -> dict[str, Any]:
    """images.html / _image_grid.html context from ``inspect.browse_images``."""
    correct = {"yes": True, "no": False}.get(filters["correct"])
    result = inspect.browse_images(svc, model.id, split=filters["split"] or None, label=filters["label"] or None,
                                   predicted=filters["predicted"] or None, correct=correct,
                                   group=filters["group"] or None, page=page, per_page=PER_PAGE)
    return {
        "model": {"name": model.name, "version": result["version"]},
        "filters": {**filters, "split": result["split"]},
        "options": result["options"],
        "images": [{"id": item["image_id"], "label": item["label"], "predicted": item["predicted"],
                    "correct": item["correct"], "confidence": item["confidence"], "group": item["group"]}
                   for item in result["items"]],
        "page": {"number": result["page"], "total_pages": result["pages"], "total_items": result["total"]},
    }


@router.get(PAGE_ROUTES["images"], response_class=HTMLResponse)
def images(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
           split: Text = None, label: Text = None, predicted: Text = None, correct: Text = None,
           group: Text = None, page: Text = None) -> Response:
    """One split's images with the current version's predictions, filtered, a page at a time."""
    found = find_model(session, model)
    view = grid_view(service(ctx), found, _filters(split, label, predicted, correct, group), _page_number(page))
    return render(request, "images.html", {**view, "nav": "images"})


@router.get(PAGE_ROUTES["image_grid"], response_class=HTMLResponse)
def image_grid(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
               split: Text = None, label: Text = None, predicted: Text = None, correct: Text = None,
               group: Text = None, page: Text = None) -> Response:
    """_image_grid.html alone (the page links swap it)."""
    found = find_model(session, model)
    view = grid_view(service(ctx), found, _filters(split, label, predicted, correct, group), _page_number(page))
    return render_fragment(request, "_image_grid.html", view)


# ---------------------------------------------------------------- one image
def _opacity(value: str | None) -> float:
    try:
        number = float(value) if value not in (None, "") else 0.5
    except ValueError:
        return 0.5
    return min(1.0, max(0.0, number)) if math.isfinite(number) else 0.5


def _target(value: str | None, concepts: list[str], classes: list[str], predicted: str) -> str:
    """``concept:<name>`` or ``class:<name>`` naming a real concept or class; else the predicted class."""
    kind, _, name = (value or "").partition(":")
    if (kind == "concept" and name in concepts) or (kind == "class" and name in classes):
        return f"{kind}:{name}"
    return f"class:{predicted}"


def _score(value: str | None) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except ValueError:
        raise InvalidInput("the new score must be a number") from None
    if number is not None and not math.isfinite(number):
        raise InvalidInput("the new score must be a finite number")
    return number


def whatif_view(result: dict[str, Any], top: int = 5) -> dict[str, Any]:
    """_whatif.html's ``whatif`` from ``inspect.whatif`` (the classes that moved most, top few)."""
    return {
        "concept": result["concept"], "score_before": result["score_before"], "score_after": result["score_after"],
        "predicted_before": result["predicted_before"], "predicted_after": result["predicted_after"],
        "probabilities": [{"name": p["class_name"], "before": p["before"], "after": p["after"]}
                          for p in result["probabilities"][:top]],
    }


def waterfall_chart(model: Model, detail: dict[str, Any]) -> Markup:
    """The predicted class's logit built from its concepts; a bar links to that concept's map."""
    steps = [(c["concept"], c["contribution"]) for c in detail["contributions"]]
    if detail.get("residual") is not None:
        steps.append(("residual (not concepts)", detail["residual"]))

    def href(concept: str) -> str:  # the page with that concept's map, scrolled to the maps
        return url("image", model=model.name, id=detail["image_id"], target=f"concept:{concept}") + "#maps-title"

    return plots.waterfall(steps, detail["bias"], detail["explained_class"], top=WATERFALL_TOP, concept_href=href)


def _map_of(ctx: Any, model: Model, image_id: str, target: str) -> tuple[Any, Any, str, Any]:
    """(map service, decoded image, kind, grid map) of ``target`` ("concept:x" | "class:y")."""
    maps = map_service(service(ctx))
    entry = maps.models.get(model.id)
    image = maps.image(entry, image_id)  # a bad id fails here, before any fallback
    kind, _, name = target.partition(":")
    try:
        result = maps.maps(entry, image, [name] if kind == "concept" else [], [name] if kind == "class" else [])
    except (AppError, PCBMError) as exc:
        return maps, image, kind, exc
    return maps, image, kind, result


def overlay_view(ctx: Any, model: Model, image_id: str, target: str, opacity: float) -> dict[str, Any]:
    """_overlay.html's ``overlay``: the target, opacity, the colour scale and a note on the method."""
    view: dict[str, Any] = {"target": target, "opacity": opacity}
    maps, _, kind, result = _map_of(ctx, model, image_id, target)
    if isinstance(result, Exception):
        view["note"] = MAPS_UNAVAILABLE.format(reason=getattr(result, "message", None) or str(result))
        return view
    grid = result["maps"][0][2]
    cmap, vmin, vmax, label = maps.scale(kind, grid, result["method"])
    view["colorbar"] = plots.colorbar_svg(vmin, vmax, cmap, label)
    view["note"] = (f"Map method: {result['method']}. " + ("Blue adds to the class, orange counts against it."
                                                           if kind == "class" else "Brighter is more of the concept."))
    return view


@router.get(PAGE_ROUTES["image"], response_class=HTMLResponse)
def image(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
          id: Annotated[str, Query(min_length=1, max_length=1024)], target: Text = None, opacity: Text = None,
          concept: Text = None, score: Text = None) -> Response:
    """One image explained: prediction, probabilities, the contribution waterfall, maps, a what-if."""
    found = find_model(session, model)
    svc = service(ctx)
    detail = inspect.image_detail(svc, found.id, id)
    concepts = [c["concept"] for c in detail["concept_scores"]]
    classes = [p["class_name"] for p in detail["probabilities"]]
    whatif = None
    messages = []
    if concept:
        try:
            new_score = _score(score)
            if new_score is not None:
                whatif = whatif_view(inspect.whatif(svc, found.id, id, concept, new_score))
        except AppError as exc:
            messages.append({"level": "error", "text": exc.message})
    chosen = _target(target, concepts, classes, detail["predicted"])
    overlay = overlay_view(ctx, found, detail["image_id"], chosen, _opacity(opacity))
    return render(request, "image.html", {
        "model": {"name": found.name, "version": detail["version"]},
        "image": {"id": detail["image_id"], "label": detail["label"], "split": detail["split"],
                  "group": detail["group"], "predicted": detail["predicted"], "correct": detail["correct"],
                  "probabilities": [{"name": p["class_name"], "prob": p["probability"]} for p in detail["probabilities"]],
                  "concepts": [{"name": c["concept"], "score": c["score"]} for c in detail["concept_scores"]]},
        "waterfall_chart": waterfall_chart(found, detail),
        "overlay": {**overlay, "concepts": concepts, "classes": sorted(classes)},
        "whatif": whatif, "nav": "images",
    }, messages=messages)


def _png(data: bytes, media_type: str, **headers: str) -> Response:
    return Response(data, media_type=media_type, headers={
        "Cache-Control": "private, max-age=300", "Content-Disposition": "inline",
        "Content-Security-Policy": "default-src 'none'", **headers})


@router.get(PAGE_ROUTES["image_file"])
def image_file(model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
               id: Annotated[str, Query(min_length=1, max_length=1024)], size: Text = None) -> Response:
    """A dataset image, decoded and re-encoded as PNG (a thumbnail with ``size``); never the raw file."""
    found = find_model(session, model)
    side = _page_number(size) if size else None
    side = min((s for s in THUMB_SIZES if s >= side), default=THUMB_SIZES[-1]) if side else None
    data, media_type = inspect.image_file(service(ctx), found.id, id, max_side=side)
    return _png(data, media_type)


@router.get(PAGE_ROUTES["overlay"], response_class=HTMLResponse)
def overlay(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
            id: Annotated[str, Query(min_length=1, max_length=1024)], target: Text = None,
            opacity: Text = None) -> Response:
    """_overlay.html alone: the map the selector picked, with its colour scale."""
    found = find_model(session, model)
    detail = inspect.image_detail(service(ctx), found.id, id)
    concepts = [c["concept"] for c in detail["concept_scores"]]
    classes = [p["class_name"] for p in detail["probabilities"]]
    chosen = _target(target, concepts, classes, detail["predicted"])
    return render_fragment(request, "_overlay.html", {
        "model": {"name": found.name}, "image": {"id": id},
        "overlay": overlay_view(ctx, found, id, chosen, _opacity(opacity)),
    })


@router.get(PAGE_ROUTES["overlay_png"])
def overlay_png(model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
                id: Annotated[str, Query(min_length=1, max_length=1024)], target: Text = None,
                opacity: Text = None) -> Response:
    """The concept or class map over the image as PNG; the image itself when maps are unavailable."""
    found = find_model(session, model)
    detail = inspect.image_detail(service(ctx), found.id, id)
    concepts = [c["concept"] for c in detail["concept_scores"]]
    classes = [p["class_name"] for p in detail["probabilities"]]
    chosen = _target(target, concepts, classes, detail["predicted"])
    maps, image, kind, result = _map_of(ctx, found, id, chosen)
    if isinstance(result, Exception):
        data, media_type = inspect.image_file(service(ctx), found.id, id, max_side=OVERLAY_SIZE)
        return _png(data, media_type, **{"X-Concept-Maps": "unavailable"})
    data = maps.overlay_png(image, kind, result["maps"][0][2], _opacity(opacity), OVERLAY_SIZE, result["method"])
    return _png(data, "image/png", **{"X-Concept-Maps": result["method"]})


@router.get(PAGE_ROUTES["whatif"], response_class=HTMLResponse)
def whatif(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
           id: Annotated[str, Query(min_length=1, max_length=1024)],
           concept: Annotated[str, Query(min_length=1, max_length=256)], score: Text = None) -> Response:
    """_whatif.html alone: the prediction with one concept's score changed (nothing is saved)."""
    found = find_model(session, model)
    try:
        new_score = _score(score)
        if new_score is None:
            raise InvalidInput("give the concept a new score")
        view = whatif_view(inspect.whatif(service(ctx), found.id, id, concept, new_score))
    except (AppError, PCBMError) as exc:
        text = getattr(exc, "message", None) or str(exc)
        status = 200 if is_htmx(request) else getattr(exc, "status_code", 422)  # htmx swaps only 2xx
        return HTMLResponse(Markup('<div id="whatif" class="whatif"><p class="flash flash-error" role="alert">{}'
                                   '</p></div>').format(text), status_code=status)
    return render_fragment(request, "_whatif.html", {"whatif": view})
