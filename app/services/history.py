"""Edit history of a model's head: an append-only chain of versions.

Every change (an edit, an undo, a revert) appends one version whose parent is the
current head; nothing is overwritten or deleted. Each append is one transaction that
holds the version row, the head pointer and an audit event; the weights file is stored
before that transaction commits. An append names the version it was made on
(``base_version``); if the head has moved since, it fails with :class:`VersionConflict`
carrying the current head, and nothing is written to the database.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import write_transaction
from app.errors import Conflict, InvalidInput, NotFound, VersionConflict
from app.models import Concept, Dataset, Model, ModelKind, ModelVersion, User
from app.services import audit
from app.services.artifacts import ArtifactStore
from app.services.head_editing import HeadEditor, HeadState, ModelInfo


def _jsonable(value: Any) -> Any:
    """A plain-JSON copy of ``value``; refuses what a JSON column could not round-trip."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"not storable as JSON: {exc}") from None


def get_model(session: Session, model_id: int) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"no model with id {model_id}")
    return model


def list_models(session: Session, *, include_study_copies: bool = False) -> list[Model]:
    """Models in id order; participants' private copies (user studies) only when asked for."""
    query = select(Model).order_by(Model.id)
    if not include_study_copies:
        from app.models_studies import Participant

        copies = select(Participant.model_id).where(Participant.model_id.is_not(None))
        query = query.where(Model.id.not_in(copies))
    return list(session.scalars(query))


def list_versions(session: Session, model_id: int) -> list[ModelVersion]:
    get_model(session, model_id)
    return list(session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model_id).order_by(ModelVersion.number)
    ))


def get_version(session: Session, model_id: int, number: int) -> ModelVersion:
    version = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.number == number)
    )
    if version is None:
        raise NotFound(f"model {model_id} has no version {number}")
    return version


def head_version(session: Session, model_id: int) -> ModelVersion:
    model = get_model(session, model_id)
    if model.head_number == 0:
        raise NotFound(f"model {model_id} has no versions yet")
    return get_version(session, model_id, model.head_number)


def version_summary(version: ModelVersion) -> dict[str, Any]:
    """The small JSON description of a version that a conflict response carries."""
    return {
        "id": version.id,
        "number": version.number,
        "op": version.edit.get("op"),
        "author_id": version.author_id,
        "message": version.message,
        "created_at": version.created_at.isoformat(),
        "weights_hash": version.weights_hash,
    }


def load_state(session: Session, artifacts: ArtifactStore, model_id: int, number: int | None = None) -> HeadState:
    """The head state of version ``number`` (the head when ``None``), verified against its hash."""
    version = head_version(session, model_id) if number is None else get_version(session, model_id, number)
    return version_state(artifacts, version)


def version_state(artifacts: ArtifactStore, version: ModelVersion) -> HeadState:
    tensors, _ = artifacts.get(version.artifact_key, expected_sha256=version.weights_hash)
    return HeadState(tensors=tensors, config=dict(version.head_config))


def model_info(session: Session, model: Model, artifacts: ArtifactStore | None = None) -> ModelInfo:
    """What an editor needs to know about ``model``: names of concepts and classes, its first version."""
    concepts = session.scalars(select(Concept.name).where(Concept.bank_id == model.bank_id).order_by(Concept.index))
    classes = session.scalar(select(Dataset.classes).where(Dataset.id == model.dataset_id)) or []
    initial = None
    if artifacts is not None and model.head_number >= 1:
        first = get_version(session, model.id, 1)
        initial = functools.partial(version_state, artifacts, first)
    return ModelInfo(model_id=model.id, kind=model.kind.value, concept_names=list(concepts),
                     class_names=list(classes), initial_state=initial)


def create_model(
    session: Session,
    artifacts: ArtifactStore,
    *,
    name: str,
    kind: ModelKind | str,
    dataset_id: int,
    backbone_id: int,
    bank_id: int,
    head: HeadState,
    author: User | None,
    message: str = "trained",
    metrics: dict[str, Any] | None = None,
) -> Model:
    """Register a trained model together with its version 1."""
    try:
        checked_kind = ModelKind(kind)
    except ValueError:
        raise InvalidInput(f"unknown model kind {kind!r}; choose pcbm or pcbm_h") from None
    stored = artifacts.put(head.tensors, {"kind": "head"})
    config, metrics = _jsonable(head.config), _jsonable(metrics)
    with write_transaction(session):
        if session.scalar(select(Model.id).where(Model.name == name)) is not None:
            raise Conflict(f"a model named {name!r} already exists")
        model = Model(name=name, kind=checked_kind, dataset_id=dataset_id, backbone_id=backbone_id,
                      bank_id=bank_id, head_number=1, created_by_id=author.id if author else None)
        session.add(model)
        session.flush()
        version = ModelVersion(model_id=model.id, number=1, parent_id=None, edit={"op": "initial"},
                               author_id=author.id if author else None, message=message,
                               weights_hash=stored.sha256, artifact_key=stored.key, head_config=config,
                               metrics=metrics)
        session.add(version)
        session.flush()
        model.head_version_id = version.id
        audit.record(session, "model.create", user=author, object_type="model", object_id=model.id,
                     payload={"name": name, "version": 1, "weights_hash": stored.sha256})
    return model


def _check_base(session: Session, model: Model, base_version: int) -> ModelVersion:
    if model.head_number != base_version:
        current = get_version(session, model.id, model.head_number)
        raise VersionConflict(
            f"model {model.id} is at version {model.head_number}, not {base_version}; "
            "reload it and make the change again",
            detail={"current_version": version_summary(current)},
        )
    return get_version(session, model.id, base_version)


def _append(
    session: Session,
    artifacts: ArtifactStore,
    model: Model,
    base: ModelVersion,
    state: HeadState,
    op: dict[str, Any],
    *,
    author: User | None,
    message: str,
    metrics: dict[str, Any] | None,
) -> ModelVersion:
    """Append a version on top of ``base`` if ``base`` is still the head; one transaction."""
    op, config, metrics = _jsonable(op), _jsonable(state.config), _jsonable(metrics)
    stored = artifacts.put(state.tensors, {"kind": "head"})  # before the commit that refers to it
    model_id, base_number, new_number = model.id, base.number, base.number + 1
    with write_transaction(session):
        # The optimistic lock: move the head from N to N+1 only if it is still at N. Under
        # PostgreSQL a concurrent commit blocks on the row and then sees the new number;
        # under SQLite writers are serialised by BEGIN IMMEDIATE. Either way one wins.
        moved = session.execute(
            update(Model)
            .where(Model.id == model_id, Model.head_number == base_number)
            .values(head_number=new_number)
            .execution_options(synchronize_session=False)
        ).rowcount
        if moved != 1:
            current = session.scalar(select(Model.head_number).where(Model.id == model_id))
            head = get_version(session, model_id, current) if current else None
            raise VersionConflict(
                f"model {model_id} is at version {current}, not {base_number}; reload it and make the change again",
                detail={"current_version": version_summary(head) if head else None},
            )
        version = ModelVersion(model_id=model_id, number=new_number, parent_id=base.id, edit=op,
                               author_id=author.id if author else None, message=message,
                               weights_hash=stored.sha256, artifact_key=stored.key, head_config=config,
                               metrics=metrics)
        session.add(version)
        session.flush()
        session.execute(
            update(Model).where(Model.id == model_id).values(head_version_id=version.id)
            .execution_options(synchronize_session=False)
        )
        audit.record(session, f"model.{op['op']}", user=author, object_type="model", object_id=model_id,
                     payload={"version": new_number, "parent": base_number, "weights_hash": stored.sha256,
                              "edit": op, "message": message})
    session.expire(model)  # the Core UPDATEs above bypassed the loaded object
    return version


def commit_edit(
    session: Session,
    artifacts: ArtifactStore,
    model_id: int,
    base_version: int,
    edits: Sequence[Mapping[str, Any]],
    *,
    author: User | None,
    editor: HeadEditor,
    message: str = "",
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Apply ``edits`` to version ``base_version`` and append the result as the new head.

    Raises :class:`VersionConflict` (with the current head in ``detail``) when
    ``base_version`` is no longer the head, and ``ml.errors.PCBMError`` for edits the
    editor refuses; in both cases nothing is written to the database.
    """
    model = get_model(session, model_id)
    base = _check_base(session, model, base_version)
    plain_edits = [dict(e) for e in edits]
    outcome = editor(model_info(session, model, artifacts), version_state(artifacts, base), plain_edits)
    op = {"op": "edit", "edits": plain_edits, "records": outcome.records}
    return _append(session, artifacts, model, base, outcome.state, op, author=author, message=message,
                   metrics=metrics)


def undo(
    session: Session, artifacts: ArtifactStore, model_id: int, base_version: int, *,
    author: User | None, message: str = "",
) -> ModelVersion:
    """Append a version with the weights of the head's parent (the head itself stays in history)."""
    model = get_model(session, model_id)
    base = _check_base(session, model, base_version)
    if base.parent_id is None:
        raise InvalidInput(f"version {base.number} is the first version of model {model_id}: nothing to undo")
    parent = session.get(ModelVersion, base.parent_id)
    assert parent is not None  # foreign key
    op = {"op": "undo", "undone": base.number, "restored": parent.number}
    return _append(session, artifacts, model, base, version_state(artifacts, parent), op,
                   author=author, message=message or f"undo version {base.number}", metrics=parent.metrics)


def revert(
    session: Session, artifacts: ArtifactStore, model_id: int, base_version: int, to_version: int, *,
    author: User | None, message: str = "",
) -> ModelVersion:
    """Append a version with the weights of version ``to_version``."""
    model = get_model(session, model_id)
    base = _check_base(session, model, base_version)
    target = get_version(session, model_id, to_version)
    if target.number == base.number:
        raise InvalidInput(f"version {to_version} is already the head of model {model_id}")
    op = {"op": "revert", "to": target.number}
    return _append(session, artifacts, model, base, version_state(artifacts, target), op,
                   author=author, message=message or f"revert to version {target.number}", metrics=target.metrics)
