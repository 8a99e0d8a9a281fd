"""A tiny workspace for page tests: 3 classes, 6 concepts, 3 splits, real image files.

Built with the library's own save functions, so the app imports and serves it exactly as
it would a real one. Concept scores are the embedding's first six coordinates; birds are
seen on water in training, and the head leans on that: "water" has a large weight for
"bird". In ``test_shifted`` the backgrounds are swapped, so pruning "water" for "bird"
fixes mistakes there, which is what an editing test wants to watch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

CLASSES = ["cat", "dog", "bird"]
CONCEPTS = ["striped", "furry", "feathers", "water", "grass", "sky"]
SPLITS = {"train": 12, "test": 8, "test_shifted": 8}  # images per class
DIM = 8
IDENTITY = "e" * 64
# head weights, classes x concepts (a sparse head: "sky" is unused)
WEIGHTS = [
    [2.0, 0.5, 0.0, -0.8, 0.6, 0.0],  # cat
    [0.0, 2.0, -0.5, -0.8, 0.8, 0.0],  # dog
    [-0.5, 0.0, 1.2, 2.5, -0.6, 0.0],  # bird
]
CONCEPT_INFO = [
    ("text", {"phrase": "a striped animal", "auroc": 0.91}),
    ("text", {"phrase": "fur", "auroc": 0.88}),
    ("text", {"phrase": "feathers", "auroc": 0.84}),
    ("cav", {"heldout_acc": 0.97, "C": 0.1, "existence": 0.2}),  # the spurious background
    ("cav", {"heldout_acc": 0.93, "C": 0.1}),
    ("discovered", {}),
]


def _background(class_index: int, split: str, generator: torch.Generator) -> str:
    on_water = class_index == 2  # birds on water, the others on grass ...
    if split == "test_shifted":
        on_water = not on_water  # ... until the world shifts
    elif torch.rand(1, generator=generator).item() < 0.1:
        on_water = not on_water
    return "water" if on_water else "land"


def build_world(root: Path) -> Path:
    """Write the workspace under ``root`` (images under ``root/images``); returns ``root``."""
    from ml.concepts import ConceptBank
    from ml.embed import EmbeddedDataset
    from ml.head import SparseLinearHead
    from ml.pcbm import PCBM
    from ml.workspace import Workspace

    generator = torch.Generator().manual_seed(7)
    images = root / "images"
    image_ids, labels, splits, groups, rows = [], [], [], [], []
    for split, per_class in SPLITS.items():
        for k, name in enumerate(CLASSES):
            for i in range(per_class):
                background = _background(k, split, generator)
                vector = 0.3 * torch.randn(DIM, generator=generator)
                vector[k] += 1.0 + 0.3 * torch.rand(1, generator=generator).item()  # the class's own concept
                vector[3 if background == "water" else 4] += 1.0
                image_id = f"{split}/{name}_{i}.png"
                path = images / image_id
                path.parent.mkdir(parents=True, exist_ok=True)
                colour = (40 + 80 * k, 200 if background == "land" else 60, 220 if background == "water" else 50)
                Image.new("RGB", (24, 24), colour).save(path)
                image_ids.append(image_id)
                labels.append(k)
                splits.append(split)
                groups.append(background)
                rows.append(vector)

    workspace = Workspace.open(root, create=True)
    workspace.backbone = "demo"
    embedded = EmbeddedDataset(torch.stack(rows), image_ids, torch.tensor(labels), list(CLASSES), splits, groups,
                               IDENTITY, str(images))
    path = workspace.new_path("embeddings", "tiny", ".safetensors")
    embedded.save(path)
    workspace.datasets["tiny"] = str(images)
    workspace.register("embeddings", "tiny", path)

    vectors = torch.eye(DIM)[: len(CONCEPTS)]
    bank = ConceptBank(names=list(CONCEPTS), vectors=vectors, sources=[s for s, _ in CONCEPT_INFO],
                       info=[dict(i) for _, i in CONCEPT_INFO], backbone_identity=IDENTITY)
    bank_dir = workspace.new_path("banks", "tiny-concepts")
    bank.save(bank_dir)
    workspace.register("banks", "tiny-concepts", bank_dir)

    head = SparseLinearHead.from_state(
        {"weight": torch.tensor(WEIGHTS), "bias": torch.zeros(len(CLASSES)),
         "mean": torch.zeros(len(CONCEPTS)), "scale": torch.ones(len(CONCEPTS))},
        {"kind": "sparse_linear_head", "lam": 1e-3, "l1_ratio": 0.99, "standardize": True, "max_iter": 10,
         "tol": 1e-6},
    )
    model_dir = workspace.new_path("models", "tiny-pcbm")
    PCBM(bank, head, list(CLASSES)).save(model_dir)
    workspace.register("models", "tiny-pcbm", model_dir)
    return root
