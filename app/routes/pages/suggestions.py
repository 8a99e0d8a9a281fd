"""The Suggestions panel of the model page: edits proposed from data, each previewed; apply with one click.

``GET url('suggestions')`` answers the panel (_suggestions.html) to htmx and the page
(suggestions.html) otherwise; with a ``method`` in the query it runs
:func:`app.services.suggestions.suggest`. ``POST url('apply_suggestions')`` commits the
chosen proposals' edits as one ordinary version; every edit keeps its ``source``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import ContextDep, SessionDep
from app.errors import InvalidInput, VersionConflict
from app.routes.pages import model as model_pages
from app.routes.pages.common import PageRoute, StaffUser, find_model, is_htmx, redirect, render, render_fragment
from app.routes.pages.edits import parse_edits
from app.routes.pages.history import conflict_message
from app.routes.pages.views import edits_json, model_header, split_order
from app.services import history, inspect, suggestions
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)

METHOD_LABELS = [("tfti", "Few-shot adaptation (TF-TTI)"), ("greedy", "Greedy prune search"),
                 ("spurious", "Spurious concepts")]
METRIC_LABELS = [("accuracy", "accuracy"), ("worst_group", "worst-group accuracy"),
                 ("balanced_accuracy", "balanced accuracy")]


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def evidence_lines(proposal: dict[str, Any]) -> list[str]:
    """The evidence of a proposal in a few sentences."""
    ev = proposal.get("evidence") or {}
    lines = []
    if proposal["kind"] == "mask":
        wrong = ", ".join(f"{c} on {n}" for c, n in ev.get("raises_wrong_class", {}).items() if n)
        against = ", ".join(f"{c} on {n}" for c, n in ev.get("lowers_true_class", {}).items() if n)
        if wrong:
            lines.append(f"Raises a wrong class: {wrong} target images.")
        if against:
            lines.append(f"Lowers the true class: {against} target images.")
    elif proposal["kind"] == "amplify":
        lines.append(f"Mean score on {ev.get('class')} images: {ev.get('source_mean', 0):+.2f} on the source, "
                     f"{ev.get('target_mean', 0):+.2f} on the target ({ev.get('images_under_activated')} of "
                     f"{ev.get('images_of_class')} target images below the source mean).")
    elif proposal["source"] == "greedy":
        lines.append(f"{ev.get('metric')}: {_pct(ev.get('before'))} → {_pct(ev.get('after'))} on the search split "
                     f"after step {ev.get('step')}.")
    elif proposal["source"] == "spurious":
        lines.append(f"Rank {ev.get('rank')}: the group explains {_pct(ev.get('eta2'))} of its within-class "
                     f"contribution (class explains {_pct(ev.get('class_eta2'))} of its score).")
    shots = ev.get("shots")
    if shots:
        lines.append(f"On the {shots['n_images']} shots: margin up on {shots['margin_up']}, down on "
                     f"{shots['margin_down']}; {shots['fixed']} fixed, {shots['broken']} broken.")
    return lines


def _splits(preview: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {s["name"]: s for s in preview}
    return [{"name": n, "n": by_name[n]["n"], "before": by_name[n]["accuracy"]["before"],
             "after": by_name[n]["accuracy"]["after"]}
            for n in split_order(by_name) if by_name[n]["accuracy"]["before"] is not None]


def panel(result: dict[str, Any] | None, form: dict[str, Any], splits: list[str],
          error: str | None = None) -> dict[str, Any]:
    """_suggestions.html's ``suggestions``."""
    view: dict[str, Any] = {"form": form, "error": error, "result": None,
                            "options": {"splits": splits, "methods": METHOD_LABELS, "metrics": METRIC_LABELS}}
    if result is None:
        return view
    params = result.get("params") or {}
    target = params.get("target_split") or params.get("split") or ""
    heldout = suggestions.HELDOUT.format(target) if result["method"] == "tfti" else target
    view["result"] = {
        "method": result["method"], "version": result["version"], "target_split": heldout,
        "shots": result.get("shots"),
        "proposals": [{"id": p["id"], "source": p["source"], "kind": p["kind"], "title": p["title"],
                       "evidence": evidence_lines(p), "edits_json": edits_json(p["edits"]),
                       "splits": _splits(p["preview"])} for p in result["proposals"]],
        "combined": ({"edits_json": edits_json(result["combined"]["edits"]),
                      "splits": _splits(result["combined"]["preview"])}
                     if len(result["proposals"]) > 1 else None),
    }
    return view


@router.get(PAGE_ROUTES["suggestions"], response_class=HTMLResponse)
def suggestions_view(
    request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
    method: Annotated[str | None, Query(max_length=16)] = None,
    target_split: Annotated[str | None, Query(max_length=64)] = None,
    shots: Annotated[int, Query(ge=1, le=64)] = 4,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    k: Annotated[int, Query(ge=1, le=20)] = 5,
    metric: Annotated[str, Query(max_length=32)] = "accuracy",
    split: Annotated[str | None, Query(max_length=64)] = None,
    top: Annotated[int, Query(ge=1, le=50)] = 5,
) -> Response:
    """The Suggestions panel; with ``method``, the proposals and their previews."""
    found = find_model(session, model)
    svc = model_pages.service(ctx)
    names = split_order(svc.get(found.id).splits)
    form = {"method": method or "tfti", "target_split": target_split or suggestions.target_split(names),
            "shots": shots, "seed": seed, "k": k, "metric": metric, "split": split or "", "top": top}
    result, error, status = None, None, 200
    if method:
        params = {"target_split": form["target_split"], "shots": shots, "seed": seed, "k": k, "metric": metric,
                  "split": split or (form["target_split"] if method == "greedy" else None), "top": top}
        try:
            result = suggestions.suggest(svc, found.id, method, params, editor=ctx.head_editor)
        except InvalidInput as exc:  # the panel says why; htmx swaps only 2xx answers
            error, status = exc.message, 422
    context = {"model": {"name": found.name, "version": found.head_number},
               "suggestions": panel(result, form, names, error)}
    if is_htmx(request):
        return render_fragment(request, "_suggestions.html", context)
    header = model_header(found)
    return render(request, "suggestions.html", {**context, "model": header, "nav": "models"}, status_code=status)


def _unique(edits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The edits without exact repeats (greedy prefixes share their first steps)."""
    seen, out = set(), []
    for edit in edits:
        key = json.dumps(edit, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(edit)
    return out


@router.post(PAGE_ROUTES["apply_suggestions"], response_class=HTMLResponse)
def apply_suggestions(
    request: Request, model: str, user: StaffUser, session: SessionDep, ctx: ContextDep,
    base_version: Annotated[int, Form(ge=1)],
    proposal: Annotated[list[str] | None, Form(max_length=200_000)] = None,
    only: Annotated[str, Form(max_length=200_000)] = "",
    message: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Commit the chosen proposals (``only``: one button's, else every ticked ``proposal``) as one version."""
    found = find_model(session, model)
    chosen = [only] if only else list(proposal or [])
    edits = _unique([e for raw in chosen for e in parse_edits(raw)])
    if not edits:
        raise InvalidInput("no suggestion chosen: tick one or more, or use a suggestion's own Apply button")
    sources = sorted({e.get("source") or "user" for e in edits})
    text = message.strip() or f"apply {len(chosen)} suggestion{'s' if len(chosen) != 1 else ''} ({', '.join(sources)})"
    try:
        svc = getattr(ctx, "models", None)
        metrics = inspect.edit_metrics(svc, found.id, edits, base_version,
                                       editor=ctx.head_editor) if svc is not None else None
        created = history.commit_edit(session, ctx.artifacts, found.id, base_version, edits, author=user,
                                      editor=ctx.head_editor, message=text, metrics=metrics)
    except VersionConflict as exc:
        session.rollback()
        return model_pages.model_page(request, session, ctx, found, status_code=409,
                                      messages=[{"level": "error", "text": conflict_message(exc, "edit")}])
    return redirect(url("model", model=found.name),
                    flash=("success", f"Applied as version {created.number}: {len(edits)} edit"
                                      f"{'s' if len(edits) != 1 else ''} from {', '.join(sources)}."))
