"""Building a small registered model (3 classes x 5 concepts) for history tests."""

from __future__ import annotations

import torch
from sqlalchemy.orm import Session

from app.models import Model, User
from app.services import catalog, history
from app.services.artifacts import ArtifactStore
from app.services.head_editing import HeadState

CLASSES = ["cat", "dog", "bird"]
CONCEPTS = ["striped", "furry", "feathers", "water", "grass"]


def head_state(seed: int = 0) -> HeadState:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "weight": torch.randn(len(CLASSES), len(CONCEPTS), generator=generator),
        "bias": torch.randn(len(CLASSES), generator=generator),
        "mean": torch.zeros(len(CONCEPTS)),
        "scale": torch.ones(len(CONCEPTS)),
    }
    return HeadState(tensors=tensors, config={"lam": 0.001, "l1_ratio": 0.99, "standardize": True})


def register_model(session: Session, artifacts: ArtifactStore, author: User | None, name: str = "birds") -> Model:
    dataset = catalog.create_dataset(session, f"{name}-data", source=f"data/{name}/manifest.csv", classes=CLASSES,
                                     info={"splits": {"train": 30, "test": 12}})
    backbone = catalog.get_or_create_backbone(session, "demo", "ab" * 32, embed_dim=16)
    bank = catalog.create_concept_bank(session, f"{name}-bank", backbone_id=backbone.id,
                                       concepts=[{"name": c, "source": "text"} for c in CONCEPTS])
    return history.create_model(session, artifacts, name=name, kind="pcbm", dataset_id=dataset.id,
                                backbone_id=backbone.id, bank_id=bank.id, head=head_state(), author=author,
                                metrics={"test": {"accuracy": 0.75}})
