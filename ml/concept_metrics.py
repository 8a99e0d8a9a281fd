"""Concept metrics: is a concept the model relies on really in the image, and where?

After Aysel, Cai and Prugel-Bennett (science notes, section 2), plus map measures the
demo world's per-pixel masks allow. Every function is pure and works on tensors:

* :func:`pointing_game`, :func:`mask_iou`, :func:`mass_in_mask`, :func:`located` score one
  map per row against that row's region (a bool mask) - batched over rows;
* :func:`cem_at_l` (existence) and :func:`clm_at_l` (location) rank concepts by their
  contribution ``W[k, j] * z_j`` to the predicted class;
* :func:`cgim` (global importance) compares a model's concept columns with how often each
  concept is annotated in each class, in three variants.

Maps are (N, H, W) float tensors and regions (N, H, W) bool tensors of the same size.
"""

from __future__ import annotations

import math

import torch

from ml.errors import ConfigError, ShapeError

CGIM_VARIANTS = ("weight", "score", "weight_x_score")
LOCATION_RULES = ("majority", "any")


def _check(maps: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if maps.ndim != 3 or tuple(maps.shape) != tuple(regions.shape):
        raise ShapeError(f"maps and regions must both be (N, H, W); got {tuple(maps.shape)} and {tuple(regions.shape)}")
    return maps.float().flatten(1), regions.bool().flatten(1)


def pointing_game(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(N,) bool: does each map's maximum fall inside its region (first maximum on ties)."""
    flat, inside = _check(maps, regions)
    return inside.gather(1, flat.argmax(dim=1, keepdim=True)).squeeze(1)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own min and max (a constant map becomes 0)."""
    flat = maps.float().flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def mask_iou(maps: torch.Tensor, regions: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N,) IoU of ``normalise(map) >= threshold`` with the region (0 when both are empty)."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"the IoU threshold must lie in [0, 1], got {threshold}")
    _check(maps, regions)
    hot = normalise(maps).flatten(1) >= threshold
    inside = regions.bool().flatten(1)
    union = (hot | inside).sum(1)
    empty = torch.zeros_like(union, dtype=torch.float)
    return torch.where(union > 0, (hot & inside).sum(1) / union.clamp_min(1), empty)


def mass_in_mask(maps: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of the map's mass inside the region, the region's share of the area), each (N,).

    Mass is the map minus its minimum, so a flat map scores exactly the area baseline.
    """
    flat, inside = _check(maps, regions)
    mass = flat - flat.min(dim=1, keepdim=True).values
    total = mass.sum(1)
    area = inside.float().mean(1)
    share = torch.where(total > 0, (mass * inside).sum(1) / total.clamp_min(1e-12), area)
    return share, area


def top_region(maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """(N, H, W) bool: the top ``alpha`` share of each map's pixels (at least one pixel)."""
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha must lie in (0, 1], got {alpha}")
    flat = maps.float().flatten(1)
    keep = max(1, math.ceil(alpha * flat.shape[1]))
    cut = flat.topk(keep, dim=1).values[:, -1:]
    return (flat >= cut).reshape(maps.shape)


def located(maps: torch.Tensor, regions: torch.Tensor, alpha: float = 0.2, rule: str = "majority") -> torch.Tensor:
    """(N,) bool: does the region fall inside the map's top ``alpha`` share.

    "majority": at least half of the top-alpha pixels lie in the region; "any": they overlap.
    A keypoint is a one-pixel region; use "any" for it.
    """
    if rule not in LOCATION_RULES:
        raise ConfigError(f"unknown location rule {rule!r}; choose one of {', '.join(LOCATION_RULES)}")
    _, inside = _check(maps, regions)
    top = top_region(maps, alpha).flatten(1)
    overlap = (top & inside).sum(1)
    if rule == "any":
        return overlap > 0
    return 2 * overlap >= top.sum(1)


def top_contributors(contributions: torch.Tensor, l: int) -> torch.Tensor:
    """(N, min(l, C)) indices of the largest contributions per row (stable for ties)."""
    if l < 1:
        raise ConfigError(f"l must be at least 1, got {l}")
    return contributions.float().argsort(dim=1, descending=True, stable=True)[:, : min(l, contributions.shape[1])]


def contributions_to(z: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, C) contributions ``W[k_n, j] * z[n, j]`` to each row's class ``k_n``."""
    return weight.float()[classes.long()] * z.float()


def cem_at_l(contributions: torch.Tensor, present: torch.Tensor, l: int = 5, positive_only: bool = True) -> dict:
    """Concept existence: the share of each image's top-l contributing concepts annotated present.

    With ``positive_only`` a concept must add to the class's logit to count as contributing
    (a sparse head gives most concepts exactly zero). Images with no contributing concept are
    left out of the mean. Returns ``{"value", "per_image" (N,, NaN when left out),
    "per_concept_hits" (C,), "per_concept_top" (C,)}``; a concept's own existence is hits / top:
    how often it is really there when it is among the top-l.
    """
    if contributions.shape != present.shape:
        raise ShapeError(f"contributions {tuple(contributions.shape)} and presence {tuple(present.shape)} differ")
    top = top_contributors(contributions, l)
    chosen = contributions.float().gather(1, top) > 0 if positive_only else torch.ones_like(top, dtype=torch.bool)
    hits = present.bool().gather(1, top) & chosen
    per_image = hits.sum(1) / chosen.sum(1).clamp_min(1)
    per_image = torch.where(chosen.any(1), per_image, torch.full_like(per_image, float("nan")))
    n_concepts = contributions.shape[1]
    counts = torch.zeros(n_concepts).index_add_(0, top.flatten(), chosen.flatten().float())
    found = torch.zeros(n_concepts).index_add_(0, top.flatten(), hits.flatten().float())
    value = nanmean(per_image)
    return {"value": float("nan") if value is None else value, "per_image": per_image,
            "per_concept_hits": found, "per_concept_top": counts}


def clm_at_l(contributions: torch.Tensor, present: torch.Tensor, is_located: torch.Tensor,
             has_location: torch.Tensor | None = None, l: int = 5, positive_only: bool = True) -> dict:
    """Concept location: of each image's top-l *present* concepts (by contribution, positive
    ones with ``positive_only``), the share whose annotated region falls inside the map's
    top-alpha share (``is_located``, (N, C) bool; see :func:`located`).

    Concepts without an annotated location (``has_location`` False) are left out. Returns
    ``{"value", "n", "per_concept_hits" (C,), "per_concept_n" (C,)}``; the value pools all
    (image, concept) pairs.
    """
    present = present.bool()
    usable = present & (has_location.bool() if has_location is not None else torch.ones_like(present))
    if positive_only:
        usable = usable & (contributions > 0)
    ranked = contributions.float().masked_fill(~usable, float("-inf"))
    top = top_contributors(ranked, l)
    chosen = usable.gather(1, top)
    hits = is_located.bool().gather(1, top) & chosen
    n_concepts = contributions.shape[1]
    per_n = torch.zeros(n_concepts).index_add_(0, top.flatten(), chosen.flatten().float())
    per_hits = torch.zeros(n_concepts).index_add_(0, top.flatten(), hits.flatten().float())
    total = int(chosen.sum())
    return {"value": float(hits.sum()) / total if total else float("nan"), "n": total,
            "per_concept_hits": per_hits, "per_concept_n": per_n}


def class_concept_frequency(present: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(K, C): the share of class k's images in which concept j is annotated present."""
    labels = labels.long()
    sums = torch.zeros(n_classes, present.shape[1]).index_add_(0, labels, present.float())
    counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).unsqueeze(1)
    return sums / counts


def _column_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between matching columns of (K, C) matrices; NaN where a column is all zero."""
    norms = a.norm(dim=0) * b.norm(dim=0)
    cos = (a * b).sum(0) / norms.clamp_min(1e-12)
    return torch.where(norms > 0, cos, torch.full_like(cos, float("nan")))


def cgim(weight: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
         present: torch.Tensor) -> dict[str, torch.Tensor]:
    """Concept global importance, per concept (C,), in three variants.

    ``weight``: the head's (K, C) weights; ``score``: the class-wise mean standardised score
    over correctly classified images; ``weight_x_score``: their product. Each is compared, by
    the cosine over classes, with the class x concept frequency of the annotations.
    """
    n_classes = weight.shape[0]
    truth = class_concept_frequency(present, labels, n_classes)
    right = predictions.long() == labels.long()
    rows = labels.long()[right]
    sums = torch.zeros(n_classes, z.shape[1]).index_add_(0, rows, z.float()[right])
    mean_scores = sums / torch.bincount(rows, minlength=n_classes).clamp_min(1).unsqueeze(1)
    models = {"weight": weight.float(), "score": mean_scores, "weight_x_score": weight.float() * mean_scores}
    return {name: _column_cosine(matrix, truth) for name, matrix in models.items()}


def nanmean(values: torch.Tensor) -> float | None:
    """Mean of the finite entries, None when there are none (JSON-friendly)."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two flattened tensors; None when either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else None


__all__ = ["CGIM_VARIANTS", "LOCATION_RULES", "cem_at_l", "cgim", "class_concept_frequency", "clm_at_l",
           "contributions_to", "located", "mask_iou", "mass_in_mask", "nanmean", "normalise", "pearson",
           "pointing_game", "top_contributors", "top_region"]
