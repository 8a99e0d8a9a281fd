"""Jinja2 set-up for the server-rendered UI: autoescaping, filters and the page URL table.

Templates never use ``|safe``. Charts arrive as ``markupsafe.Markup`` built by
``app.plots`` (every label in them is escaped there), so autoescaping leaves them alone
and escapes everything else.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from string import Formatter
from typing import Any
from urllib.parse import quote, urlencode

import jinja2

from app.resources import TEMPLATE_DIR

# One table of page URLs, shared by the templates (through the ``url`` global) and by the
# page routes (``@router.get(PAGE_ROUTES["history"])``), so a link can never point at a
# path no route serves. ``{name}`` parts are path parameters; every other keyword passed
# to ``url`` becomes the query string. Image ids are opaque strings and always travel in
# the query (``id=``) because they may contain slashes.
PAGE_ROUTES: dict[str, str] = {
    "home": "/",
    "login": "/login",
    "logout": "/logout",
    "model": "/models/{model}",  # ?class=&q=&sort=&order=
    "concept_table": "/models/{model}/concepts",  # fragment _concept_table.html
    "preview": "/models/{model}/preview",  # POST edits -> _preview.html (or full model page)
    "commit": "/models/{model}/commit",  # POST edits, base_version, message
    "undo": "/models/{model}/undo",  # POST base_version
    "history": "/models/{model}/history",  # ?a=&b= adds the comparison
    "diff": "/models/{model}/diff",  # fragment _diff.html, ?a=&b=
    "revert": "/models/{model}/revert",  # POST version, base_version
    "images": "/models/{model}/images",  # ?split=&label=&predicted=&correct=&group=&page=
    "image_grid": "/models/{model}/images/grid",  # fragment _image_grid.html, same query
    "image": "/models/{model}/images/view",  # ?id=&target=&opacity=&concept=&score=
    "image_file": "/models/{model}/images/file",  # ?id=&size= (re-encoded PNG/JPEG)
    "overlay": "/models/{model}/images/overlay",  # fragment _overlay.html, ?id=&target=&opacity=
    "overlay_png": "/models/{model}/images/overlay.png",  # ?id=&target=&opacity=
    "whatif": "/models/{model}/images/whatif",  # fragment _whatif.html, ?id=&concept=&score=
    "upload": "/models/{model}/images/upload",  # GET form, POST multipart field "image"
    "bank": "/models/{model}/bank",
    "suggestions": "/models/{model}/suggestions",  # ?method=&target_split=&shots=&seed=&k=&metric=&split=&top=
    "apply_suggestions": "/models/{model}/suggestions/apply",  # POST base_version, proposal (repeated) | only
    "images_index": "/images",  # nav entries without a model: redirect to the default model
    "concepts_index": "/concepts",
    "build": "/build",  # embed a dataset, build a concept bank, train a model (each a job)
    "build_dataset": "/build/dataset",  # POST name, path, backbone
    "build_bank": "/build/bank",  # POST name, kind, phrases | examples
    "build_model": "/build/model",  # POST name, embeddings, bank, hybrid, lam
    "jobs": "/jobs",
    "job": "/jobs/{job}",
    "job_progress": "/jobs/{job}/progress",  # fragment _job_progress.html
    "studies": "/studies",  # researchers: their studies; POST creates one. Participants: sent to "participate"
    "study_new": "/studies/new",  # the form that creates a study
    "study": "/studies/{study}",  # the dashboard (progress, results, invitations, export)
    "study_status": "/studies/{study}/status",  # POST action=open|close
    "study_invite": "/studies/{study}/invitations",  # POST count -> the dashboard with the new links, shown once
    "study_join": "/join",  # GET ?code= the consent page; POST code, consent -> a participant session
    "participate": "/participate",  # the participant's workspace
    "participate_status": "/participate/status",  # fragment _study_status.html (timer, budget), polled
    "participate_class": "/participate/class",  # fragment _study_concepts.html, ?class=
    "participate_concept": "/participate/concept",  # fragment _study_concept.html, ?concept=
    "participate_examples": "/participate/examples",  # fragment _study_examples.html, ?concept= (maps tool)
    "participate_image": "/participate/image",  # ?id=&size=&concept= PNG of a shown split's image (maps tool)
    "participate_suggestions": "/participate/suggestions",  # fragment _study_suggestions.html
    "participate_preview": "/participate/preview",  # POST base_version, prunes (JSON), prune -> _study_preview.html
    "participate_commit": "/participate/commit",  # POST base_version, prunes (JSON) | prune + class
    "participate_undo": "/participate/undo",  # POST base_version
    "participate_submit": "/participate/submit",  # POST version, confirm
}

MINUS = "\u2212"  # a real minus sign lines up with "+" in tables


def _missing(value: Any) -> bool:
    return (value is None or isinstance(value, jinja2.Undefined)
            or (isinstance(value, float) and math.isnan(value)))


def pct(value: float | None, digits: int = 1) -> str:
    """0.873 -> "87.3%"; None or NaN -> "—"."""
    if _missing(value):
        return "\u2014"
    text = f"{float(value) * 100:.{digits}f}%"
    return text.replace("-", MINUS)


def signed(delta: float | None, digits: int = 1) -> str:
    """An accuracy change in percentage points: +0.021 -> "+2.1 pts", -0.03 -> "−3.0 pts"."""
    if _missing(delta):
        return "\u2014"
    points = round(float(delta) * 100, digits)
    if points == 0:
        return f"\u00b1{0:.{digits}f} pts"
    sign = "+" if points > 0 else MINUS
    return f"{sign}{abs(points):.{digits}f} pts"


def sign_class(delta: float | None, digits: int = 1) -> str:
    """CSS class for a change, rounded as ``signed`` shows it: "pos", "neg" or "zero"."""
    if _missing(delta):
        return "zero"
    points = round(float(delta) * 100, digits)
    return "pos" if points > 0 else "neg" if points < 0 else "zero"


def num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    """A plain number with a fixed number of decimals and a real minus sign."""
    if _missing(value):
        return "\u2014"
    rounded = round(float(value), digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = f"{rounded:+.{digits}f}" if sign and rounded != 0 else f"{rounded:.{digits}f}"
    return text.replace("-", MINUS)


def ago(when: datetime | float | int | None, now: datetime | None = None) -> str:
    """A datetime (or epoch seconds) as "3 min ago"; naive datetimes are taken as UTC."""
    if when is None:
        return "\u2014"
    if isinstance(when, (int, float)):
        when = datetime.fromtimestamp(when, tz=UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    seconds = (now - when).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 10:
        return "just now"
    for limit, unit_seconds, unit in (
        (60, 1, "s"),
        (3600, 60, "min"),
        (86400, 3600, "h"),
        (30 * 86400, 86400, "day"),
    ):
        if seconds < limit:
            count = int(seconds // unit_seconds)
            label = f"{unit}s" if unit == "day" and count != 1 else unit
            return f"in {count} {label}" if future else f"{count} {label} ago"
    return when.strftime("%Y-%m-%d")


def short_hash(value: str | None, length: int = 8) -> str:
    """"sha256:9f86d08188…" -> "9f86d081"."""
    if not value:
        return ""
    text = str(value)
    if ":" in text:
        text = text.split(":", 1)[1]
    return text[:length]


def query_string(params: dict[str, Any] | None = None, **overrides: Any) -> str:
    """``{"split": "test", "page": 2}`` -> ``"?split=test&page=2"``; empty values are dropped."""
    merged = {**(params or {}), **overrides}
    pairs = [(key, _query_value(v)) for key, v in merged.items() if not _missing(v) and v != ""]
    return "?" + urlencode(pairs) if pairs else ""


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def url(name: str, params: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The path of page route ``name``: path parameters filled in, the rest as a query string."""
    try:
        pattern = PAGE_ROUTES[name]
    except KeyError:
        raise KeyError(f"no page route named {name!r}") from None
    values = {**(params or {}), **kwargs}
    path_names = [field for _, field, _, _ in Formatter().parse(pattern) if field]
    missing = [field for field in path_names if _missing(values.get(field)) or values.get(field) == ""]
    if missing:
        raise KeyError(f"page route {name!r} needs {', '.join(missing)}")
    path = pattern.format(**{field: quote(str(values.pop(field)), safe="") for field in path_names})
    return path + query_string(values)


FILTERS = {
    "pct": pct,
    "signed": signed,
    "sign_class": sign_class,
    "num": num,
    "ago": ago,
    "short_hash": short_hash,
    "query": query_string,
}


def make_environment(directory: str | Path | None = None, *, strict: bool = False) -> jinja2.Environment:
    """A Jinja2 environment with autoescaping on for every template, whatever its name.

    ``strict=True`` makes an undefined variable an error (used by the tests, so a context
    key a template needs but a fixture lacks fails loudly).
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory or TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined if strict else jinja2.Undefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    env.globals["url"] = url
    return env


def make_templates(directory: str | Path | None = None, *, strict: bool = False):
    """A ``fastapi.templating.Jinja2Templates`` over ``directory`` (default: the top-level templates/)."""
    from fastapi.templating import Jinja2Templates  # imported here so plots/tests need no web stack

    env = make_environment(directory, strict=strict)
    templates = Jinja2Templates(env=env)
    # Starlette may add globals; it must never turn escaping off.
    if templates.env.autoescape is not True:
        raise RuntimeError("templates must autoescape")
    return templates
