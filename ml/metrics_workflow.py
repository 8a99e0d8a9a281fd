"""Concept metrics of a model on an annotated dataset: the function behind ``pcbm metrics``.

Two stages, so that a served app can keep the expensive one:

1. :func:`localise` runs the backbone once per image and scores every (image, concept) map
   against the annotated region: pointing game, IoU, mass in the region, located in the
   top-alpha share. It depends on the backbone, the bank and the map method, not the head.
2. :func:`summarise` adds the head: existence (CEM@l), location (CLM@l), global importance
   (CGIM) and per-concept breakdowns. It takes milliseconds, so it follows every edit.

Annotations live in a folder (by default the dataset's root, as the demo world writes it):
``attributes.csv`` (image,concept,present; image relative to the folder), optional
``world.json`` naming each concept's kind (object | background) and group, and masks:
``masks/<concept>/<image stem>.png`` for one concept, or ``masks/<image stem>.png`` for the
object (255), whose complement is the region of every background concept.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from ml import cam
from ml import concept_metrics as cm
from ml.errors import ConfigError, DataError

Progress = Callable[[int, int], None]


@dataclass
class Annotations:
    root: Path
    presence: dict[str, dict[str, bool]]  # image key -> concept -> present
    kinds: dict[str, str] = field(default_factory=dict)  # concept -> "object" | "background"
    groups: dict[str, str] = field(default_factory=dict)

    def key(self, image_id: str) -> str | None:
        """The annotation key of a dataset image id: its path, else its unique file stem."""
        if image_id in self.presence:
            return image_id
        stems = getattr(self, "_stems", None)
        if stems is None:
            stems = {}
            for key in self.presence:
                stems.setdefault(PurePosixPath(key).stem, []).append(key)
            self._stems = stems
        found = stems.get(PurePosixPath(image_id).stem, [])
        return found[0] if len(found) == 1 else None

    def presence_matrix(self, image_ids: Sequence[str], concepts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(present, known), both (N, C) bool."""
        present = torch.zeros(len(image_ids), len(concepts), dtype=torch.bool)
        known = torch.zeros_like(present)
        for i, image_id in enumerate(image_ids):
            row = self.presence.get(self.key(image_id) or "", {})
            for j, concept in enumerate(concepts):
                if concept in row:
                    known[i, j], present[i, j] = True, row[concept]
        return present, known

    def regions(self, image_id: str, concepts: Sequence[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(regions (C, S, S) bool, has (C,) bool) in the model's input view of the image."""
        regions, has = self._regions(image_id, tuple(concepts), size)
        return torch.from_numpy(regions), torch.from_numpy(has)

    def _regions(self, image_id: str, concepts: tuple[str, ...], size: int) -> tuple[np.ndarray, np.ndarray]:
        # numpy, not torch: a thousand tiny tensor ops per batch cost more in thread hand-offs than work
        stem = PurePosixPath(image_id).stem
        is_object, is_known = self._kind_arrays(concepts)
        object_path = self.root / "masks" / f"{stem}.png"
        if object_path.is_file():
            mask = _mask(object_path, size)
            regions = np.where(is_object[:, None, None], mask[None], ~mask[None])
            has = is_known.copy()
        else:
            regions = np.zeros((len(concepts), size, size), dtype=bool)
            has = np.zeros(len(concepts), dtype=bool)
        if self.per_concept_masks:
            for j, concept in enumerate(concepts):
                own = self.root / "masks" / concept / f"{stem}.png"
                if own.is_file():
                    regions[j], has[j] = _mask(own, size), True
        return regions & has[:, None, None], has

    def _kind_arrays(self, concepts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.setdefault("_kind_cache", {})
        if concepts not in cache:
            kinds = [self.kinds.get(c) for c in concepts]
            cache[concepts] = (np.array([k == "object" for k in kinds], dtype=bool),
                               np.array([k in ("object", "background") for k in kinds], dtype=bool))
        return cache[concepts]

    @property
    def per_concept_masks(self) -> bool:
        """Whether masks/ holds any per-concept folder (looked up once)."""
        found = getattr(self, "_per_concept", None)
        if found is None:
            folder = self.root / "masks"
            found = self._per_concept = folder.is_dir() and any(p.is_dir() for p in folder.iterdir())
        return found


def _mask(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        gray = image.convert("L")
        view = gray if gray.size == (size, size) else cam.input_view(gray, size, Image.Resampling.NEAREST)
    return np.asarray(view) > 127


def load_annotations(root: str | Path) -> Annotations:
    """Read an annotation folder (module docstring); DataError naming what is missing."""
    base = Path(root).expanduser().resolve()
    table = base / "attributes.csv"
    if not table.is_file():
        raise DataError(f"no concept annotations at {base}: expected {table.name} (image,concept,present) "
                        "and masks/; pass --annotations DIR")
    presence: dict[str, dict[str, bool]] = {}
    with open(table, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"image", "concept", "present"} <= set(reader.fieldnames or []):
            raise DataError(f"{table} needs the columns image,concept,present")
        for row in reader:
            present = row["present"].strip() in ("1", "true", "True")
            presence.setdefault(row["image"].strip(), {})[row["concept"].strip()] = present
    kinds, groups = {}, {}
    world = base / "world.json"
    if world.is_file():
        try:
            for concept in json.loads(world.read_text(encoding="utf-8")).get("concepts", []):
                kinds[concept["name"]], groups[concept["name"]] = concept.get("kind", ""), concept.get("group", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"{world} is not a world description with a 'concepts' list") from None
    return Annotations(base, presence, kinds, groups)


# ---------------------------------------------------------------------------- stage 1: maps
@dataclass
class LocalisationTable:
    """Per (image, concept): what the annotation says and how the map scored, all (N, C)."""

    image_ids: list[str]
    concepts: list[str]
    kinds: list[str]
    groups: list[str]
    method: str
    alpha: float
    iou_threshold: float
    rule: str
    tensors: dict[str, torch.Tensor]  # present, known, has_region (bool); pointing, located (bool);
    #                                   iou, mass, area, map_mean (float)
    seconds: float = 0.0

    def save(self, path: str | Path) -> None:
        """One safetensors file (the tensors) with the rest as its JSON metadata."""
        from ml.store import save_tensors

        meta = {"kind": "pcbm.localisation_table", "image_ids": self.image_ids, "concepts": self.concepts,
                "kinds": self.kinds, "groups": self.groups, "method": self.method, "alpha": self.alpha,
                "iou_threshold": self.iou_threshold, "rule": self.rule, "seconds": self.seconds}
        save_tensors(path, self.tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> LocalisationTable:
        from ml.store import load_tensors

        tensors, meta = load_tensors(path)
        if meta.get("kind") != "pcbm.localisation_table":
            raise DataError(f"{path} is not a concept-localisation table")
        try:
            return cls(meta["image_ids"], meta["concepts"], meta["kinds"], meta["groups"], meta["method"],
                       meta["alpha"], meta["iou_threshold"], meta["rule"], tensors, meta.get("seconds", 0.0))
        except KeyError as exc:
            raise DataError(f"{path} lacks {exc.args[0]!r}") from None

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)


def localise(backbone, bank, dataset_root: str | Path, image_ids: Sequence[str], annotations: Annotations,
             method: str | None = None, alpha: float = 0.2, iou_threshold: float = 0.5, rule: str = "majority",
             batch_size: int = 64, progress: Progress | None = None,
             slot: Callable[[], Any] | None = None, cache: cam.TokenCache | None = None) -> LocalisationTable:
    """Map every image once and score each annotated concept's map against its region.

    ``slot`` (optional) is entered around each batch's backbone pass, e.g. an app's
    inference limit; ``cache`` keeps tokens for the next method or request;
    ``progress(done, total)`` follows each batch.
    """
    from ml.data import open_image
    from ml.store import safe_join

    started = time.perf_counter()
    chosen = cam.parse_method(method, cam.architecture(backbone))
    concepts = list(bank.names)
    size = int(backbone.image_size)
    n, c = len(image_ids), len(concepts)
    present, known = annotations.presence_matrix(image_ids, concepts)
    floats = {k: torch.zeros(n, c) for k in ("iou", "mass", "area", "map_mean")}
    bools = {k: torch.zeros(n, c, dtype=torch.bool) for k in ("has_region", "pointing", "located")}
    # Memory: a batch holds (B, C, S, S) maps; keep it near 16M floats whatever the bank.
    step = max(1, min(batch_size, 16_000_000 // max(1, c * size * size)))
    for start in range(0, n, step):
        ids = list(image_ids[start:start + step])
        images = [open_image(safe_join(dataset_root, i)) for i in ids]
        with (slot() if slot is not None else contextlib.nullcontext()):
            tokens = cam.spatial_tokens(backbone, images, chosen, cache=cache, batch_size=step)
        raw = cam.score_maps(tokens, bank)
        maps = raw if chosen.contrast is None else cam.maps_from_tokens(tokens, bank, chosen)
        maps = cam.upsample(maps, size)
        rows = slice(start, start + len(ids))
        floats["map_mean"][rows] = raw.mean(dim=(2, 3))
        parts = [annotations._regions(i, tuple(concepts), size) for i in ids]  # noqa: SLF001 - numpy, batched
        regions = torch.from_numpy(np.stack([p[0] for p in parts]))
        has = torch.from_numpy(np.stack([p[1] for p in parts]))
        bools["has_region"][rows] = has
        # Only maps of present concepts with a region are scored (a third of them in the demo world).
        scored = (has & present[rows]).flatten().nonzero().flatten()
        flat_maps, flat_regions = maps.flatten(0, 1)[scored], regions.flatten(0, 1)[scored]
        for name, values in (("pointing", cm.pointing_game(flat_maps, flat_regions)),
                             ("located", cm.located(flat_maps, flat_regions, alpha, rule)),
                             ("iou", cm.mask_iou(flat_maps, flat_regions, iou_threshold)),
                             *zip(("mass", "area"), cm.mass_in_mask(flat_maps, flat_regions), strict=False)):
            target = bools[name] if name in bools else floats[name]
            block = torch.zeros(len(ids) * c, dtype=target.dtype)
            block[scored] = values.to(target.dtype)
            target[rows] = block.view(len(ids), c)
        if progress is not None:
            progress(min(start + step, n), n)
    kinds = [annotations.kinds.get(x, "object" if bools["has_region"][:, j].any() else "")
             for j, x in enumerate(concepts)]
    return LocalisationTable(list(image_ids), concepts, kinds, [annotations.groups.get(x, "") for x in concepts],
                             chosen.name, alpha, iou_threshold, rule,
                             {"present": present, "known": known, **bools, **floats},
                             seconds=round(time.perf_counter() - started, 2))


# ---------------------------------------------------------------------------- stage 2: the head
def _number(value: float) -> float | None:
    return None if value is None or value != value else float(value)


def _share(values: torch.Tensor, where: torch.Tensor) -> float | None:
    picked = values[where]
    return float(picked.float().mean()) if picked.numel() else None


def summarise(table: LocalisationTable, head, z: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
              l: int = 5) -> dict[str, Any]:
    """The report: pointing game, IoU and mass by kind, CEM@l, CLM@l, CGIM, per concept."""
    predictions = logits.argmax(1)
    contributions = cm.contributions_to(z, head.weight_, predictions)
    present, scored = table.present, table.present & table.has_region
    cem = cm.cem_at_l(contributions, present, l)
    clm = cm.clm_at_l(contributions, present, table.located, table.has_region, l)
    importance = cm.cgim(head.weight_, z, labels, predictions, present)
    raw_scores = z * head.scale_ + head.mean_
    kinds = torch.tensor([[k == kind for k in table.kinds] for kind in ("object", "background")])

    def by_kind(values: torch.Tensor) -> dict[str, float | None]:
        return {kind: _share(values, scored & kinds[i]) for i, kind in enumerate(("object", "background"))}

    per_group = {g: _share(table.pointing, scored & torch.tensor([x == g for x in table.groups]))
                 for g in dict.fromkeys(table.groups) if g}
    max_abs = head.weight_.abs().amax(0)
    per_concept = {}
    for j, name in enumerate(table.concepts):
        mask = scored[:, j]
        top = float(cem["per_concept_top"][j])
        located_n = float(clm["per_concept_n"][j])
        per_concept[name] = {
            "kind": table.kinds[j] or None, "group": table.groups[j] or None, "n_present": int(present[:, j].sum()),
            "pointing_game": _share(table.pointing[:, j], mask), "iou": _share(table.iou[:, j], mask),
            "mass_in_mask": _share(table.mass[:, j], mask), "area": _share(table.area[:, j], mask),
            "n_top": int(top), "existence": float(cem["per_concept_hits"][j]) / top if top else None,
            "n_located": int(located_n),
            "location": float(clm["per_concept_hits"][j]) / located_n if located_n else None,
            "cgim": {v: (None if not torch.isfinite(importance[v][j]) else float(importance[v][j]))
                     for v in cm.CGIM_VARIANTS},
            "max_abs_weight": float(max_abs[j]),
            "map_score_correlation": cm.pearson(table.map_mean[:, j], raw_scores[:, j]),
        }
    return {
        "method": table.method, "n_images": len(table.image_ids), "l": l, "alpha": table.alpha,
        "iou_threshold": table.iou_threshold, "location_rule": table.rule,
        "pointing_game": {**by_kind(table.pointing), "all": _share(table.pointing, scored), "per_group": per_group,
                          "chance": by_kind(table.area)},
        "mass_in_mask": {kind: {"mass": m, "area": a} for (kind, m), a in
                         zip(by_kind(table.mass).items(), by_kind(table.area).values(), strict=True)},
        "iou": by_kind(table.iou),
        "cem": _number(cem["value"]), "clm": _number(clm["value"]), "clm_pairs": clm["n"],
        "cgim": {v: cm.nanmean(importance[v]) for v in cm.CGIM_VARIANTS},
        "map_vs_score": {"pearson": cm.pearson(table.map_mean, raw_scores),
                         "mean_per_concept": cm.nanmean(torch.tensor(
                             [x["map_score_correlation"] if x["map_score_correlation"] is not None else float("nan")
                              for x in per_concept.values()]))},
        "accuracy": float((predictions == labels).float().mean()) if len(labels) else None,
        "per_concept": per_concept,
    }


# ---------------------------------------------------------------------------- the CLI's workflow
def metrics(root: Path, model_name: str, split: str = "test", annotations_dir: Path | None = None,
            method: str | None = None, embeddings_name: str | None = None, l: int = 5, alpha: float = 0.2,
            iou_threshold: float = 0.5, rule: str = "majority", batch_size: int = 64, limit: int | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Concept metrics of a workspace model on one split of its embedded dataset."""
    from ml.backbone import load_backbone
    from ml.embed import EmbeddedDataset
    from ml.pcbm import load_model
    from ml.workflows import default_embeddings
    from ml.workspace import Workspace

    started = time.perf_counter()
    workspace = Workspace.open(root)
    model = load_model(workspace.path_for("models", model_name))
    name = default_embeddings(workspace, embeddings_name)
    part = EmbeddedDataset.load(workspace.path_for("embeddings", name)).split(split)
    if limit is not None:
        part = _first(part, limit)
    if not workspace.backbone:
        raise ConfigError(f"workspace {workspace.root} names no backbone; run `pcbm embed` first")
    backbone = load_backbone(workspace.backbone)
    if part.backbone_identity and backbone.identity != part.backbone_identity:
        raise ConfigError(f"the backbone {workspace.backbone!r} is not the one embeddings {name!r} were made with")
    annotations = load_annotations(annotations_dir or part.dataset_root)
    with torch.no_grad():
        table = localise(backbone, model.bank, part.dataset_root, part.image_ids, annotations, method=method,
                         alpha=alpha, iou_threshold=iou_threshold, rule=rule, batch_size=batch_size, progress=progress)
        z = model.head.transform(model.bank.project(part.embeddings))
        report = summarise(table, model.head, z, model.decision_function(part.embeddings), part.labels, l=l)
    return {"model": model_name, "embeddings": name, "split": split, "annotations": str(annotations.root),
            **report, "seconds": {"maps": table.seconds, "total": round(time.perf_counter() - started, 2)}}


def _first(part, limit: int):
    from ml.embed import EmbeddedDataset

    k = min(int(limit), len(part))
    return EmbeddedDataset(part.embeddings[:k], part.image_ids[:k], part.labels[:k], part.classes, part.splits[:k],
                           part.groups[:k], part.backbone_identity, part.dataset_root)
