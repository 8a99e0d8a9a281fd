"""Comparing versions, and checking that a model's history explains its weights."""

from __future__ import annotations

from typing import Any

import torch
from sqlalchemy.orm import Session

from app.services.artifacts import ArtifactStore
from app.services.head_editing import HeadEditor, HeadState
from app.services.history import get_model, get_version, list_versions, model_info, version_state
from ml.store import tensors_sha256


def _name(names: list[str], index: int) -> str | None:
    return names[index] if 0 <= index < len(names) else None


def diff_versions(
    session: Session, artifacts: ArtifactStore, model_id: int, from_number: int, to_number: int, *, limit: int = 100
) -> dict[str, Any]:
    """What changed between two versions: per tensor, the largest weight changes, the config."""
    model = get_model(session, model_id)
    info = model_info(session, model)
    before = version_state(artifacts, get_version(session, model_id, from_number))
    after = version_state(artifacts, get_version(session, model_id, to_number))
    tensors = []
    for name in sorted(set(before.tensors) | set(after.tensors)):
        a, b = before.tensors.get(name), after.tensors.get(name)
        entry: dict[str, Any] = {
            "name": name,
            "shape_from": list(a.shape) if a is not None else None,
            "shape_to": list(b.shape) if b is not None else None,
            "changed": None,
            "max_abs_change": None,
        }
        if a is not None and b is not None and a.shape == b.shape:
            delta = (b.double() - a.double()).abs()
            entry["changed"] = int((delta > 0).sum())
            entry["max_abs_change"] = float(delta.max()) if delta.numel() else 0.0
        tensors.append(entry)

    weight_changes: list[dict[str, Any]] = []
    truncated = False
    a, b = before.tensors.get("weight"), after.tensors.get("weight")
    if a is not None and b is not None and a.shape == b.shape and a.ndim == 2:
        delta = (b.double() - a.double())
        changed = torch.nonzero(delta != 0, as_tuple=False)
        order = torch.argsort(delta[changed[:, 0], changed[:, 1]].abs(), descending=True) if len(changed) else []
        truncated = len(changed) > limit
        for position in list(order)[:limit]:
            row, column = (int(v) for v in changed[int(position)])
            weight_changes.append({
                "class_index": row, "class_name": _name(info.class_names, row),
                "concept_index": column, "concept_name": _name(info.concept_names, column),
                "before": float(a[row, column]), "after": float(b[row, column]),
            })
    config_changes = {
        key: [before.config.get(key), after.config.get(key)]
        for key in sorted(set(before.config) | set(after.config))
        if before.config.get(key) != after.config.get(key)
    }
    return {
        "model_id": model_id, "from_version": from_number, "to_version": to_number,
        "tensors": tensors, "weight_changes": weight_changes, "truncated": truncated,
        "config_changes": config_changes,
    }


def replay_history(
    session: Session, artifacts: ArtifactStore, model_id: int, editor: HeadEditor
) -> dict[int, HeadState]:
    """Recompute every version from version 1 and the recorded operations alone."""
    model = get_model(session, model_id)
    info = model_info(session, model, artifacts)
    states: dict[int, HeadState] = {}
    by_id = {}
    for version in list_versions(session, model_id):
        by_id[version.id] = version.number
        op = version.edit.get("op")
        if op == "initial":
            states[version.number] = version_state(artifacts, version)
        elif op == "edit":
            parent = states[by_id[version.parent_id]]
            states[version.number] = editor(info, parent, version.edit["edits"]).state
        elif op == "undo":
            states[version.number] = states[version.edit["restored"]]
        elif op == "revert":
            states[version.number] = states[version.edit["to"]]
        else:
            raise ValueError(f"version {version.number} has an unknown op {op!r}")
    return states


def verify_history(session: Session, artifacts: ArtifactStore, model_id: int, editor: HeadEditor) -> list[str]:
    """Problems found in a model's history (empty when the chain is sound and replays exactly)."""
    problems = []
    versions = list_versions(session, model_id)
    numbers = [v.number for v in versions]
    if numbers != list(range(1, len(versions) + 1)):
        problems.append(f"version numbers are not contiguous: {numbers}")
    ids = {v.id: v.number for v in versions}
    for version in versions[1:]:
        if ids.get(version.parent_id) != version.number - 1:
            problems.append(f"version {version.number} does not have version {version.number - 1} as its parent")
    model = get_model(session, model_id)
    if versions and (model.head_number != versions[-1].number or model.head_version_id != versions[-1].id):
        problems.append("the head pointer is not the last version")
    for number, state in replay_history(session, artifacts, model_id, editor).items():
        if tensors_sha256(state.tensors) != versions[number - 1].weights_hash:
            problems.append(f"replaying the history does not reproduce version {number}")
    return problems
