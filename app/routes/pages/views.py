"""Turning service results into the plain dicts the templates document (no queries of their own)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.models import Model, ModelVersion


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def accuracy_by_split(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """``{"test": {"accuracy": 0.8, ...}, "shifted": 0.6}`` -> ``{"test": 0.8, "shifted": 0.6}``.

    A version's metrics hold one report per split (or a bare accuracy); anything else in
    them (per-group tables, counts) is not a split and is left out.
    """
    result: dict[str, float] = {}
    for split, value in (metrics or {}).items():
        if isinstance(value, Mapping):
            value = value.get("accuracy")
        number = _finite(value)
        if number is not None:
            result[str(split)] = number
    return result


def split_order(names: Iterable[str]) -> list[str]:
    """Splits in a readable order: train, val, test first, then the rest (e.g. shifted) by name."""
    preferred = ("train", "val", "validation", "test")
    unique = list(dict.fromkeys(names))
    return [n for n in preferred if n in unique] + sorted(n for n in unique if n not in preferred)


def model_header(model: Model, **extra: Any) -> dict[str, Any]:
    """The ``model`` dict every model page gets: names of what it is built from and its version."""
    return {
        "id": model.id,
        "name": model.name,
        "backbone": model.backbone.spec if model.backbone is not None else "",
        "dataset": model.dataset.name if model.dataset is not None else "",
        "bank": model.bank.name if model.bank is not None else "",
        "version": model.head_number,
        "classes": list(model.dataset.classes or []) if model.dataset is not None else [],
        **extra,
    }


def edit_words(edit: Mapping[str, Any]) -> str:
    """One edit in words, like _macros.edit_text, for the history table."""
    concept = edit.get("concept", "?")
    scope = f"for {edit['class_name']}" if edit.get("class_name") else "for every class"
    op = edit.get("op")
    if op in ("prune", "prune_normalize"):
        return f"prune “{concept}” {scope}" + (" (renormalised)" if op == "prune_normalize" else "")
    if op == "set":
        return f"set “{concept}” to {edit.get('value')} {scope}"
    if op == "scale":
        return f"scale “{concept}” by {edit.get('value')} {scope}"
    if op == "restore":
        return f"restore “{concept}” {scope}"
    return f"{op} “{concept}” {scope}"


def version_op(version: ModelVersion) -> str:
    """What made a version, in words: "trained", "prune “water” for every class", "undo v3"."""
    edit = version.edit or {}
    op = edit.get("op")
    if op == "initial":
        return "trained"
    if op == "edit":
        return "; ".join(edit_words(e) for e in edit.get("edits", [])) or "edit"
    if op == "undo":
        return f"undo v{edit.get('undone')} (back to v{edit.get('restored')})"
    if op == "revert":
        return f"revert to v{edit.get('to')}"
    return str(op or "?")


def version_rows(versions: Sequence[ModelVersion]) -> list[dict[str, Any]]:
    """history.html's rows, newest first."""
    numbers = {v.id: v.number for v in versions}
    rows = []
    for version in reversed(versions):
        rows.append({
            "number": version.number,
            "parent": numbers.get(version.parent_id) if version.parent_id is not None else None,
            "author": version.author.name if version.author is not None else "—",
            "message": version.message,
            "op": version_op(version),
            "created_at": version.created_at,
            "accuracy": accuracy_by_split(version.metrics),
        })
    return rows


def edits_json(edits: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([dict(e) for e in edits], separators=(",", ":"))
