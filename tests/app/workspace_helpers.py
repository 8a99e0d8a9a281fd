"""A tiny workspace for model-service tests: a random tiny open_clip backbone, random
embeddings with a learnable signal, one concept bank, a PCBM and a PCBM-h.

The fixtures are session-scoped and the workspace is read-only for tests; a test that
changes files copies it first (``copy_workspace``). Import the fixtures into a test module
with ``from .workspace_helpers import tiny_backbone, tiny_workspace  # noqa: F401``.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

CLASSES = ["bird", "cat", "dog"]
CONCEPTS = ["feathers", "whiskers", "snout", "water", "grass", "wings", "paws", "beak", "stripes", "sky"]
SPLITS = {"train": 120, "val": 30, "test": 48}
GROUPS = ["land", "water"]
EMBED_DIM = 32
TINY_CLIP = {  # a real open_clip ViT, tiny: these tests are about serving, not compute
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


@dataclass(frozen=True)
class TinyBackbone:
    spec: str
    identity: str


def png_bytes(size: tuple[int, int] = (12, 10), color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_backbone(folder: Path) -> TinyBackbone:
    import open_clip
    from safetensors.torch import save_file

    from ml.backbone import load_backbone

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    spec = f"open_clip:local-dir:{folder}"
    return TinyBackbone(spec=spec, identity=load_backbone(spec, device="cpu").identity)


def build_workspace(root: Path, backbone: TinyBackbone, seed: int = 0) -> Path:
    """Write the workspace (images, embeddings, bank, two models) under ``root``."""
    from ml.concepts import ConceptBank
    from ml.embed import EmbeddedDataset
    from ml.head import SparseLinearHead
    from ml.pcbm import PCBM, PCBMHybrid
    from ml.workspace import Workspace

    generator = torch.Generator().manual_seed(seed)
    n = sum(SPLITS.values())
    splits = [name for name, count in SPLITS.items() for _ in range(count)]
    embeddings = torch.randn(n, EMBED_DIM, generator=generator)
    vectors = torch.nn.functional.normalize(torch.randn(len(CONCEPTS), EMBED_DIM, generator=generator), dim=1)
    sources = ["text" if i % 3 else "cav" for i in range(len(CONCEPTS))]
    info = [{"phrase": c} if s == "text" else {"heldout_acc": 0.6 + 0.03 * i, "C": 0.1, "near_chance": False}
            for i, (c, s) in enumerate(zip(CONCEPTS, sources, strict=True))]
    bank = ConceptBank(names=list(CONCEPTS), vectors=vectors, intercepts=torch.zeros(len(CONCEPTS)),
                       sources=sources, info=info, backbone_identity=backbone.identity)
    scores = bank.project(embeddings)
    truth = torch.zeros(len(CLASSES), len(CONCEPTS))
    truth[0, [0, 5, 7]] = 3.0  # bird: feathers, wings, beak
    truth[1, [1, 8]] = 3.0  # cat: whiskers, stripes
    truth[2, [2, 6]] = 3.0  # dog: snout, paws
    standard = (scores - scores.mean(0)) / scores.std(0)
    labels = (standard @ truth.T + 1.5 * torch.randn(n, len(CLASSES), generator=generator)).argmax(1)
    groups = [GROUPS[int(s > 0)] for s in standard[:, 3].tolist()]  # "water" concept decides the group

    data = root / "data"
    image_ids = []
    for i, (split, label) in enumerate(zip(splits, labels.tolist(), strict=True)):
        image_id = f"{split}/{CLASSES[label]}/img{i:04d}.png"
        path = data / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8 + i % 5, 8), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(path)
        image_ids.append(image_id)

    workspace = Workspace.open(root, create=True)
    embedded = EmbeddedDataset(embeddings, image_ids, labels, list(CLASSES), splits, groups, backbone.identity,
                               str(data.resolve()))
    path = workspace.new_path("embeddings", "toy", ".safetensors")
    embedded.save(path)
    workspace.datasets["toy"] = str(data.resolve())
    workspace.register("embeddings", "toy", path)
    bank_dir = workspace.new_path("banks", "concepts")
    bank.save(bank_dir)
    workspace.register("banks", "concepts", bank_dir)

    train = embedded.split("train")
    pcbm = PCBM(bank, SparseLinearHead(lam=0.02, max_iter=500), list(CLASSES)).fit(train.embeddings, train.labels)
    hybrid = PCBMHybrid(pcbm.copy(), epochs=3, batch_size=32).fit(train.embeddings, train.labels)
    for name, model in (("pcbm", pcbm), ("pcbm_h", hybrid)):
        directory = workspace.new_path("models", name)
        model.save(directory)
        workspace.register("models", name, directory)
    workspace.backbone = backbone.spec
    workspace.default_model = "pcbm"
    workspace.save()
    return root


def copy_workspace(source: Path, target: Path) -> Path:
    """A private copy whose embedded dataset points at the copy's own images."""
    from ml.embed import EmbeddedDataset

    shutil.copytree(source, target)
    path = target / "embeddings" / "toy.safetensors"
    embedded = EmbeddedDataset.load(path)
    embedded.dataset_root = str((target / "data").resolve())
    embedded.save(path)
    return target


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    return make_backbone(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: TinyBackbone) -> Path:
    return build_workspace(tmp_path_factory.mktemp("tiny-ws"), tiny_backbone)
