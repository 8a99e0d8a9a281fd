"""A model's versions: the table, accuracy across versions, reverting, comparing two versions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from app import plots
from app.context import AppContext
from app.deps import ContextDep, SessionDep
from app.errors import InvalidInput, VersionConflict
from app.models import Model
from app.routes.pages.common import PageRoute, StaffUser, find_model, redirect, render, render_fragment
from app.routes.pages.views import accuracy_by_split, model_header, split_order, version_rows
from app.services import diffs, history
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)

DIFF_LIMIT = 200
_PICK_TWO = ('<section id="diff" class="diff"><p class="muted">Pick a version as A and another as B, '
             'then compare them.</p></section>')


def _version_number(value: str | None) -> int | None:
    """A version number from the query; blanks and junk mean "not picked"."""
    value = (value or "").strip().lstrip("v")
    return int(value) if value.isdigit() and len(value) < 10 else None


def diff_view(session, ctx: AppContext, model: Model, a: int, b: int) -> dict[str, Any]:
    """_diff.html's ``diff`` from ``diffs.diff_versions`` plus each version's stored accuracy."""
    result = diffs.diff_versions(session, ctx.artifacts, model.id, a, b, limit=DIFF_LIMIT)
    first, second = history.get_version(session, model.id, a), history.get_version(session, model.id, b)
    acc_a, acc_b = accuracy_by_split(first.metrics), accuracy_by_split(second.metrics)
    weight_tensor = next((t for t in result["tensors"] if t["name"] == "weight"), None)
    changes = result["weight_changes"]
    return {
        "a": {"number": a, "message": first.message, "author": first.author.name if first.author else ""},
        "b": {"number": b, "message": second.message, "author": second.author.name if second.author else ""},
        "metrics": [{"name": s, "a": acc_a[s], "b": acc_b[s]} for s in split_order(set(acc_a) & set(acc_b))],
        "weights": [{"class_name": c["class_name"] or str(c["class_index"]),
                     "concept": c["concept_name"] or str(c["concept_index"]),
                     "a": c["before"], "b": c["after"]} for c in changes],
        "n_changed": (weight_tensor or {}).get("changed") or len(changes),
    }


def metrics_chart(rows: list[dict[str, Any]], splits: list[str]):
    """Accuracy per split across versions (oldest first), or None when no version has any."""
    if not splits:
        return None
    oldest_first = list(reversed(rows))
    series = {split: [row["accuracy"].get(split) for row in oldest_first] for split in splits}
    return plots.metric_lines(series, [f"v{row['number']}" for row in oldest_first], "Accuracy across versions")


def history_page(request: Request, session, ctx: AppContext, model: Model, *, a: int | None = None,
                 b: int | None = None, status_code: int = 200, messages: list[dict] | None = None) -> Response:
    rows = version_rows(history.list_versions(session, model.id))
    splits = split_order(name for row in rows for name in row["accuracy"])
    diff = diff_view(session, ctx, model, a, b) if a is not None and b is not None else None
    return render(request, "history.html", {
        "model": model_header(model), "versions": rows, "splits": splits,
        "metrics_chart": metrics_chart(rows, splits), "compare": {"a": a, "b": b}, "diff": diff,
        "can_edit": True, "nav": "models",
    }, status_code=status_code, messages=messages)


@router.get(PAGE_ROUTES["history"], response_class=HTMLResponse)
def history_view(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
                 a: Annotated[str | None, Query(max_length=12)] = None,
                 b: Annotated[str | None, Query(max_length=12)] = None) -> Response:
    """Every version newest first; with ``a`` and ``b``, the two side by side."""
    found = find_model(session, model)
    return history_page(request, session, ctx, found, a=_version_number(a), b=_version_number(b))


@router.get(PAGE_ROUTES["diff"], response_class=HTMLResponse)
def diff_fragment(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
                  a: Annotated[str | None, Query(max_length=12)] = None,
                  b: Annotated[str | None, Query(max_length=12)] = None) -> Response:
    """_diff.html alone, for the compare form's htmx swap."""
    found = find_model(session, model)
    first, second = _version_number(a), _version_number(b)
    if first is None or second is None:
        return HTMLResponse(_PICK_TWO, headers={"Cache-Control": "no-store"})
    return render_fragment(request, "_diff.html", {"model": model_header(found),
                                                   "diff": diff_view(session, ctx, found, first, second)})


def conflict_message(exc: VersionConflict, what: str) -> str:
    """A stale version, said plainly: who moved the model on, and what to do now."""
    current = (exc.detail or {}).get("current_version") or {}
    number = current.get("number")
    said = f" (“{current['message']}”)" if current.get("message") else ""
    where = f"it is now at version {number}{said}" if number else "it has changed"
    return (f"Someone else changed this model while you were looking: {where}. "
            f"Your {what} was not saved. Look at the current version and do it again if it still makes sense.")


@router.post(PAGE_ROUTES["revert"], response_class=HTMLResponse)
def revert(request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
           version: Annotated[int, Form(ge=1)], base_version: Annotated[int, Form(ge=1)],
           message: Annotated[str, Form(max_length=2000)] = "") -> Response:
    """Append a version with the weights of ``version`` (nothing is deleted)."""
    found = find_model(session, model)
    try:
        created = history.revert(session, ctx.artifacts, found.id, base_version, version, author=user,
                                 message=message.strip())
    except VersionConflict as exc:
        session.rollback()
        return history_page(request, session, ctx, found, status_code=409,
                            messages=[{"level": "error", "text": conflict_message(exc, "revert")}])
    except InvalidInput as exc:
        session.rollback()
        return history_page(request, session, ctx, found, status_code=422,
                            messages=[{"level": "error", "text": exc.message}])
    return redirect(url("history", model=found.name),
                    flash=("success", f"Reverted to v{version}: the weights of v{version} are now version "
                                      f"{created.number}."))
