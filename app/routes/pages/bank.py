"""A model's concept bank: where each concept comes from, how good it is, how much the model uses it."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import ContextDep, SessionDep
from app.routes.pages.common import PageRoute, StaffUser, find_model, render
from app.services import history
from app.services.maps import FLAG_EXISTENCE, FLAG_WEIGHT_SHARE, concept_checks, flagged
from app.templating import PAGE_ROUTES

router = APIRouter(route_class=PageRoute)

FLAG_RULE = (f"|weight| at least {FLAG_WEIGHT_SHARE:.0%} of the largest, and really present in under "
             f"{FLAG_EXISTENCE:.0%} of the images where it is a top contributor")
_QUALITY = (("heldout_acc", "CAV accuracy"), ("auroc", "AUROC"))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def concept_rows(concepts: list[Any], max_abs: list[float],
                 checks: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """bank.html's rows: the bank's recorded provenance and quality, the head's largest weight, and
    existence/location from the concept metrics (``checks``; else what the bank recorded)."""
    largest = max(max_abs, default=0.0)
    rows = []
    for concept, weight in zip(concepts, max_abs, strict=True):
        info = concept.info or {}
        quality, quality_kind = next(((_number(info.get(key)), kind) for key, kind in _QUALITY
                                      if _number(info.get(key)) is not None), (None, None))
        measured = (checks or {}).get(concept.name, {})
        existence = _number(measured.get("existence", info.get("existence")))
        location = _number(measured.get("location", info.get("location")))
        rows.append({
            "name": concept.name, "source": concept.source,
            "phrase": info.get("phrase") if isinstance(info.get("phrase"), str) else "",
            "quality": quality, "quality_kind": quality_kind, "existence": existence,
            "location": location, "max_abs_weight": weight, "flagged": flagged(weight, largest, existence),
        })
    return rows


@router.get(PAGE_ROUTES["bank"], response_class=HTMLResponse)
def bank(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep) -> Response:
    """Every concept of the model's bank with its source, quality (held-out CAV accuracy or text
    AUROC, as the bank recorded them) and its largest weight in the current version."""
    found = find_model(session, model)
    weight = history.load_state(session, ctx.artifacts, found.id).tensors["weight"]
    max_abs = weight.abs().amax(0).tolist() if weight.numel() else []
    concepts = list(found.bank.concepts)
    if len(max_abs) != len(concepts):  # a head that does not match its bank: show the bank, no weights
        max_abs = [0.0] * len(concepts)
    checks, note = concept_checks(getattr(ctx, "models", None), found.id)
    return render(request, "bank.html", {
        "model": {"name": found.name, "version": found.head_number},
        "bank": {"name": found.bank.name, "backbone": found.backbone.spec},
        "concepts": concept_rows(concepts, max_abs, checks), "flag_rule": FLAG_RULE, "nav": "concepts",
        "metrics_note": note,
    })
