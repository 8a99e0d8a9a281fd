"""Classification and concept-detection metrics on torch tensors.

Functions take predictions (class indices, shape (N,)) or logits (N, K) -- logits are
turned into predictions by argmax. Empty classes/groups give NaN in per-class/per-group
tensors and are skipped by the summaries. Metric tensors are float64 (exact ratios).
"""

from __future__ import annotations

import torch

from ml.errors import DataError, ShapeError


def _predictions(predictions_or_logits: torch.Tensor) -> torch.Tensor:
    if predictions_or_logits.ndim == 2:
        return predictions_or_logits.argmax(1)
    if predictions_or_logits.ndim != 1:
        raise ShapeError(f"expected predictions (N,) or logits (N, K), got shape {tuple(predictions_or_logits.shape)}")
    return predictions_or_logits.long()


def _pair(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    preds = _predictions(predictions)
    labels = torch.as_tensor(labels).to(preds.device).long()
    if labels.shape != preds.shape:
        raise ShapeError(f"{preds.shape[0]} predictions but labels have shape {tuple(labels.shape)}")
    return preds, labels


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions (NaN for no examples)."""
    preds, labels = _pair(predictions, labels)
    return float((preds == labels).float().mean()) if labels.numel() else float("nan")


def _rate_by(index: torch.Tensor, correct: torch.Tensor, count: int) -> torch.Tensor:
    """Share of ``correct`` within each index value, float64 (exact counts), NaN where empty."""
    totals = torch.bincount(index, minlength=count).double()
    hits = torch.bincount(index, weights=correct.double(), minlength=count)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=totals.device)
    return torch.where(totals > 0, hits / totals.clamp_min(1), nan)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
    """Recall of each class, shape (K,); NaN where a class has no examples."""
    preds, labels = _pair(predictions, labels)
    count = n_classes if n_classes is not None else int(labels.max()) + 1 if labels.numel() else 0
    return _rate_by(labels, preds == labels, count).cpu()


def per_group_accuracy(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                       n_groups: int | None = None) -> torch.Tensor:
    """Accuracy within each group, shape (G,); NaN for empty groups."""
    preds, labels = _pair(predictions, labels)
    groups = torch.as_tensor(groups).to(preds.device).long()
    if groups.shape != labels.shape:
        raise ShapeError(f"groups have shape {tuple(groups.shape)}, expected {tuple(labels.shape)}")
    count = n_groups if n_groups is not None else int(groups.max()) + 1 if groups.numel() else 0
    return _rate_by(groups, preds == labels, count).cpu()


def worst_group_accuracy(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                         n_groups: int | None = None) -> tuple[int, float]:
    """(index, accuracy) of the non-empty group with the lowest accuracy."""
    rates = per_group_accuracy(predictions, labels, groups, n_groups)
    present = ~torch.isnan(rates)
    if not present.any():
        raise DataError("no group has any examples")
    masked = torch.where(present, rates, torch.tensor(float("inf")))
    index = int(masked.argmin())
    return index, float(rates[index])


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None) -> float:
    """Mean recall over the classes that have examples."""
    rates = per_class_accuracy(predictions, labels, n_classes)
    present = ~torch.isnan(rates)
    return float(rates[present].mean()) if present.any() else float("nan")


def _auroc_columns(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    if scores.ndim != 2 or present.shape != scores.shape:
        raise ShapeError(
            f"scores {tuple(scores.shape)} and ground truth {tuple(present.shape)} must be equal 2-D shapes")
    scores = scores.double()
    if not torch.isfinite(scores).all():
        raise DataError("scores contain NaN or Inf values")
    positive = present.to(scores.device).bool()
    n_pos = positive.sum(0).double()
    n_neg = (~positive).sum(0).double()
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    # per column, the sorted negative scores (positives pushed to +inf at the end)
    negatives = torch.where(positive, inf, scores).T.contiguous().sort(dim=1).values
    queries = scores.T.contiguous()
    below = torch.searchsorted(negatives, queries, side="left").double()
    ties = torch.searchsorted(negatives, queries, side="right").double() - below
    wins = ((below + 0.5 * ties) * positive.T).sum(1)
    auc = wins / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.tensor(float("nan"), dtype=auc.dtype)).cpu()


def concept_auroc(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-column AUROC of ``scores`` (N, C) against a binary ground truth (N, C).

    Rank-based (Mann-Whitney): P(score of a positive > score of a negative), ties
    counting one half. Columns with no positives or no negatives give NaN.
    """
    return _auroc_columns(scores, present)


def auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Binary AUROC of ``scores`` (N,) for ``targets`` (N,) in {0, 1}; ties count one half."""
    scores, targets = torch.as_tensor(scores).reshape(-1), torch.as_tensor(targets).reshape(-1)
    if scores.shape != targets.shape:
        raise ShapeError(f"{scores.shape[0]} scores but {targets.shape[0]} targets")
    value = float(_auroc_columns(scores[:, None], targets[:, None])[0])
    if value != value:
        raise DataError("AUROC needs at least one positive and one negative example")
    return value


def class_auroc(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One-vs-rest AUROC of each class's logit, shape (K,); NaN for absent classes."""
    labels = torch.as_tensor(labels).long()
    onehot = torch.nn.functional.one_hot(labels.to(logits.device), logits.shape[1]).bool()
    return concept_auroc(logits, onehot)


def head_sparsity(weight: torch.Tensor) -> dict[str, float]:
    """Sparsity of a head's weight matrix (K, C)."""
    nonzero = weight != 0
    return {
        "sparsity": float((~nonzero).float().mean()),
        "nonzeros": int(nonzero.sum()),
        "nonzeros_per_class": float(nonzero.sum(1).float().mean()),
        "concepts_used": int(nonzero.any(0).sum()),
    }
