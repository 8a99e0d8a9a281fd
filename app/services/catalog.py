"""Registering what a model is built from: datasets, backbones and concept banks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import write_transaction
from app.errors import Conflict, InvalidInput, NotFound
from app.models import Backbone, Concept, ConceptBank, Dataset, User
from app.services import audit


def create_dataset(
    session: Session, name: str, *, source: str, classes: Sequence[str], info: dict[str, Any] | None = None,
    actor: User | None = None,
) -> Dataset:
    if len(set(classes)) != len(classes):
        raise InvalidInput(f"dataset {name!r} lists a class twice")
    with write_transaction(session):
        if session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
            raise Conflict(f"a dataset named {name!r} already exists")
        dataset = Dataset(name=name, source=source, classes=list(classes), info=info or {})
        session.add(dataset)
        session.flush()
        audit.record(session, "dataset.create", user=actor, object_type="dataset", object_id=dataset.id,
                     payload={"name": name, "source": source})
    return dataset


def get_or_create_backbone(session: Session, spec: str, identity: str, embed_dim: int | None = None) -> Backbone:
    """Backbones are keyed by identity (spec + weights + preprocessing), so registering is idempotent."""
    with write_transaction(session):
        backbone = session.scalar(select(Backbone).where(Backbone.identity == identity))
        if backbone is None:
            backbone = Backbone(spec=spec, identity=identity, embed_dim=embed_dim)
            session.add(backbone)
            session.flush()
    return backbone


def create_concept_bank(
    session: Session, name: str, *, backbone_id: int, concepts: Sequence[dict[str, Any]],
    source: str | None = None, actor: User | None = None,
) -> ConceptBank:
    """``concepts``: one dict per column, in order, with ``name``, ``source`` and optional ``info``."""
    if not concepts:
        raise InvalidInput(f"concept bank {name!r} has no concepts")
    names = [c["name"] for c in concepts]
    if len(set(names)) != len(names):
        raise InvalidInput(f"concept bank {name!r} names a concept twice")
    with write_transaction(session):
        if session.get(Backbone, backbone_id) is None:
            raise NotFound(f"no backbone with id {backbone_id}")
        if session.scalar(select(ConceptBank.id).where(ConceptBank.name == name)) is not None:
            raise Conflict(f"a concept bank named {name!r} already exists")
        bank = ConceptBank(name=name, backbone_id=backbone_id, source=source)
        bank.concepts = [
            Concept(index=i, name=c["name"], source=c.get("source", "text"), info=c.get("info") or {})
            for i, c in enumerate(concepts)
        ]
        session.add(bank)
        session.flush()
        audit.record(session, "concept_bank.create", user=actor, object_type="concept_bank", object_id=bank.id,
                     payload={"name": name, "concepts": len(concepts)})
    return bank
