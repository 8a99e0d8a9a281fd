"""The model page: what drives each class (charts, the concept table) and the edit workspace."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from app import plots
from app.context import AppContext
from app.deps import ContextDep, SessionDep
from app.errors import Unavailable
from app.models import Model
from app.routes.pages.common import PageRoute, StaffUser, find_model, render, render_fragment
from app.routes.pages.views import edits_json, model_header, split_order
from app.services import history, inspect
from app.services.maps import concept_checks, flagged
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)

TABLE_SORTS = ("weight", "name", "max_abs_weight", "quality")
CHART_TOP = 8  # strongest concepts for and against the class in the bar chart
MAX_HEATMAP_CONCEPTS = 120
MAX_FLIPPED_SHOWN = 24


def service(ctx: AppContext) -> Any:
    """The process's model service (``ctx.models``), or 503 while the server runs without one."""
    models = getattr(ctx, "models", None)
    if models is None:
        raise Unavailable("this server has no model service running, so models cannot be inspected right now")
    return models


def watched_split(names: list[str]) -> str:
    """The split an edit is meant to help: the shifted one when there is one, else test."""
    for name in names:
        if "shift" in name.lower() or "ood" in name.lower():
            return name
    return "test" if "test" in names else (names[0] if names else "")


def _heatmap_cell(columns: int) -> int:
    """Cells as large as fit in about 560 px: roomy for a few concepts, 14 px for many."""
    return max(14, min(32, 560 // max(columns, 1)))


def _table_state(q: str | None, sort: str | None, order: str | None) -> dict[str, str]:
    return {"q": (q or "").strip()[:200], "sort": sort if sort in TABLE_SORTS else "weight",
            "order": order if order in ("asc", "desc") else "desc"}


def _concept_rows(weights: dict[str, Any], svc: Any = None, model_id: int | None = None) -> list[dict[str, Any]]:
    """The table's rows, with existence and location from the concept metrics once they are ready."""
    checks: dict[str, dict[str, Any]] = {}
    largest = 0.0
    if svc is not None and model_id is not None:
        checks, _ = concept_checks(svc, model_id)
        largest = float(svc.get(model_id).head.weight_.abs().max()) if checks else 0.0
    rows = []
    for row in weights["concepts"]:
        measured = checks.get(row["concept"], {})
        rows.append({"name": row["concept"], "weight": row["weight"], "max_abs_weight": row["max_abs_weight"],
                     "source": row["source"], "quality": row["quality"], "existence": measured.get("existence"),
                     "location": measured.get("location"),
                     "flagged": flagged(row["max_abs_weight"], largest, measured.get("existence"))})
    return rows


def _parent_number(session: Session, model: Model) -> int | None:
    head = history.head_version(session, model.id)
    return head.parent.number if head.parent is not None else None


def class_view(svc: Any, model: Model, selected: str | None, state: dict[str, str]) -> dict[str, Any]:
    """Charts and the concept table of one class (from ``inspect.concept_weights`` / ``head_matrix``)."""
    matrix = inspect.head_matrix(svc, model.id)
    classes = matrix["classes"]
    chosen = selected if selected in classes else classes[0]
    row = matrix["weights"][classes.index(chosen)]
    weights = inspect.concept_weights(svc, model.id, class_name=chosen, q=state["q"] or None,
                                      sort=state["sort"], order=state["order"])

    def concept_href(concept: str) -> str:
        return url("model", model=model.name, **{"class": chosen, "q": concept})

    columns = matrix["nonzero_concepts"] or matrix["concepts"]
    columns = sorted(columns, key=lambda c: -max(abs(w[matrix["concepts"].index(c)]) for w in matrix["weights"]))
    columns = columns[:MAX_HEATMAP_CONCEPTS]
    picked = [matrix["concepts"].index(c) for c in columns]
    return {
        "classes": classes,
        "selected_class": chosen,
        "weight_chart": plots.weight_bars(list(zip(matrix["concepts"], row, strict=False)), f"Concept weights for {chosen}",
                                          top=CHART_TOP, concept_href=concept_href),
        "heatmap_chart": plots.heatmap(classes, columns, [[w[i] for i in picked] for w in matrix["weights"]],
                                       "Weights of every class × concept", cell=_heatmap_cell(len(columns))),
        "concepts": _concept_rows(weights, svc, model.id),
        "table": state,
    }


def model_page(request: Request, session: Session, ctx: AppContext, model: Model, *,
               class_name: str | None = None, q: str | None = None, sort: str | None = None,
               order: str | None = None, preview: dict[str, Any] | None = None,
               pending_edits: list[dict[str, Any]] | None = None, status_code: int = 200,
               messages: list[dict[str, str]] | None = None) -> Response:
    """model.html for ``model``'s current version (also after a refused commit, with its message)."""
    svc = service(ctx)
    session.refresh(model)  # a commit may have moved the head in this very request
    view = class_view(svc, model, class_name, _table_state(q, sort, order))
    header = model_header(model, parent=_parent_number(session, model), classes=view.pop("classes"))
    return render(request, "model.html", {
        "model": header, **view, "can_edit": True, "nav": "models",
        "pending_edits_json": edits_json(pending_edits or []), "preview": preview,
    }, status_code=status_code, messages=messages)


@router.get(PAGE_ROUTES["model"], response_class=HTMLResponse)
def model_view(
    request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
    class_name: Annotated[str | None, Query(alias="class", max_length=256)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    sort: Annotated[str | None, Query(max_length=32)] = None,
    order: Annotated[str | None, Query(max_length=8)] = None,
) -> Response:
    """One model: weights of a class, the class × concept heatmap, the concept table, edits."""
    return model_page(request, session, ctx, find_model(session, model), class_name=class_name, q=q, sort=sort,
                      order=order)


@router.get(PAGE_ROUTES["concept_table"], response_class=HTMLResponse)
def concept_table(
    request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
    class_name: Annotated[str | None, Query(alias="class", max_length=256)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    sort: Annotated[str | None, Query(max_length=32)] = None,
    order: Annotated[str | None, Query(max_length=8)] = None,
) -> Response:
    """_concept_table.html alone (the table's sort links swap it)."""
    found = find_model(session, model)
    state = _table_state(q, sort, order)
    svc = service(ctx)
    classes = inspect.head_matrix(svc, found.id)["classes"]
    chosen = class_name if class_name in classes else classes[0]
    weights = inspect.concept_weights(svc, found.id, class_name=chosen, q=state["q"] or None,
                                      sort=state["sort"], order=state["order"])
    return render_fragment(request, "_concept_table.html", {
        "model": {"name": found.name, "version": found.head_number}, "selected_class": chosen,
        "concepts": _concept_rows(weights, svc, found.id), "table": state, "can_edit": True,
    })


# ---------------------------------------------------------------- the preview's numbers
def _pairs(rows: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
    """Before/after rows that have both numbers (an empty class or group has none)."""
    return [{"name": prefix + row["name"], "before": row["before"], "after": row["after"], "n": row["n"]}
            for row in rows if row.get("before") is not None and row.get("after") is not None]


def preview_context(result: dict[str, Any], base_version: int) -> dict[str, Any]:
    """_preview.html's ``preview`` from ``inspect.preview``: every split, the watched split's groups
    and classes, and a sample of images whose prediction changes."""
    by_name = {s["name"]: s for s in result["splits"]}
    names = split_order(by_name)
    target = watched_split(names)
    splits = [{"name": n, "before": by_name[n]["accuracy"]["before"], "after": by_name[n]["accuracy"]["after"],
               "n": by_name[n]["n"]} for n in names]
    splits = [s for s in splits if s["before"] is not None and s["after"] is not None]
    watched = by_name.get(target)
    groups: list[dict[str, Any]] = []
    for name in names:
        if len(by_name[name]["groups"]) > 1:
            groups += _pairs(by_name[name]["groups"], prefix=f"{name} · ")
    worst = None
    if watched is not None and watched["worst_group"]["after"]:
        after = watched["worst_group"]["after"]
        before = next((g["before"] for g in watched["groups"] if g["name"] == after["group"]), None)
        if before is not None:
            worst = {"name": f"{target} · {after['group']}", "before": before, "after": after["accuracy"]}
    flipped = [{"id": f["image_id"], "label": f["label"], "before": f["before"], "after": f["after"]}
               for name in ([target] + [n for n in names if n != target]) if name in by_name
               for f in by_name[name]["flipped"]][:MAX_FLIPPED_SHOWN]
    chart = plots.delta_bars([(s["name"], s["before"], s["after"]) for s in splits], "Accuracy before and after",
                             highlight=[target] if target else ()) if splits else None
    return {
        "edits": result["edits"],
        "edits_json": edits_json(result["edits"]),
        "base_version": base_version,
        "splits": splits,
        "target_split": target,
        "groups": groups,
        "worst_group": worst,
        "classes": _pairs(watched["classes"]) if watched is not None else [],
        "flipped": flipped,
        "n_flipped": sum(s["n_flipped"] for s in result["splits"]),
        "chart": chart,
    }
