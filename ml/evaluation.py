"""Incremental evaluation: preview an edit's effect on a split before committing it.

An :class:`EvalCache` keeps, for one evaluation split, the head's standardised concept
scores ``Z`` and the logits of the model it was built from. An edit changes a few
columns of the head's weights (and ``prune_normalize`` rescales whole rows), so the
edited logits are a low-rank update of the cached ones,
``logits * s + Z[:, cols] @ dW[:, cols].T + db``, instead of a full ``Z @ W.T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ml.errors import ConfigError, ShapeError
from ml.head import SparseLinearHead, check_labels
from ml.metrics import _rate_by


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def classification_report(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None,
                          class_names: Sequence[str] | None = None,
                          group_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class and per-group accuracy and the worst group.

    Empty classes or groups report ``None``. ``logits`` may also be predictions (N,).
    """
    preds = logits.argmax(1) if logits.ndim == 2 else logits.long()
    labels = labels.to(preds.device)
    n_classes = logits.shape[1] if logits.ndim == 2 else len(class_names or []) or int(labels.max()) + 1
    class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    correct = preds == labels
    per_class = _rate_by(labels, correct, len(class_names)).tolist()
    present = [v for v in per_class if not math.isnan(v)]
    report: dict[str, Any] = {
        "n": int(labels.numel()),
        "accuracy": float(correct.double().mean()) if labels.numel() else None,
        "balanced_accuracy": sum(present) / len(present) if present else None,
        "per_class": {name: _none_if_nan(v) for name, v in zip(class_names, per_class, strict=True)},
        "per_group": {},
        "worst_group": None,
    }
    if groups is not None:
        groups = groups.to(preds.device)
        n_groups = len(group_names) if group_names is not None else int(groups.max()) + 1 if groups.numel() else 0
        names = list(group_names) if group_names is not None else [str(i) for i in range(n_groups)]
        rates = _rate_by(groups, correct, len(names)).tolist()
        report["per_group"] = {name: _none_if_nan(v) for name, v in zip(names, rates, strict=True)}
        filled = [(v, name) for name, v in zip(names, rates, strict=True) if not math.isnan(v)]
        if filled:
            worst = min(filled, key=lambda item: item[0])
            report["worst_group"] = {"group": worst[1], "accuracy": worst[0]}
    return report


def _head_of(model: Any) -> SparseLinearHead:
    head = model if isinstance(model, SparseLinearHead) else getattr(model, "head", None)
    if not isinstance(head, SparseLinearHead) or not hasattr(head, "weight_"):
        raise ConfigError("expected a fitted head, PCBM or PCBM-h")
    return head


def _group_indices(groups: Any, group_names: Sequence[str] | None, count: int):
    if groups is None:
        return None, []
    if isinstance(groups, torch.Tensor):
        groups = groups.to("cpu", torch.long).reshape(-1)
        names = list(group_names) if group_names is not None else [str(i) for i in range(int(groups.max()) + 1)]
        if groups.numel() and (groups.min() < 0 or groups.max() >= len(names)):
            raise ConfigError(f"group index out of range for {len(names)} groups")
    else:  # names per image, as EmbeddedDataset.groups; None means "no group"
        values = ["(none)" if g is None else str(g) for g in groups]
        if all(g is None for g in groups):
            return None, []
        names = list(group_names) if group_names is not None else sorted(set(values))
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"groups not among group_names: {', '.join(unknown[:5])}")
        lookup = {name: i for i, name in enumerate(names)}
        groups = torch.tensor([lookup[v] for v in values], dtype=torch.long)
    if groups.shape[0] != count:
        raise ShapeError(f"{groups.shape[0]} group entries for {count} images")
    return groups, names


@dataclass
class EvalCache:
    """Cached standardised concept scores and base logits of one evaluation split."""

    features_t: torch.Tensor  # (C, N) standardised concept scores, concept-major for column gathers
    labels: torch.Tensor  # (N,) long
    groups: torch.Tensor | None  # (N,) long group indices, or None
    base_logits: torch.Tensor  # (N, K) logits of the model the cache was built from
    base_weight: torch.Tensor  # (K, C) that model's head weights (on the cache's device)
    base_bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (C,) the head's standardisation, to detect an incompatible head
    scale: torch.Tensor  # (C,)
    class_names: list[str]
    group_names: list[str]
    concept_names: list[str]
    _base_report: dict | None = field(default=None, repr=False)  # computed once, on first preview
    _base_pred: torch.Tensor | None = field(default=None, repr=False)

    @property
    def features(self) -> torch.Tensor:
        """Z, shape (N, C) (a view)."""
        return self.features_t.T

    @classmethod
    def build(cls, model: Any, data: Any, labels: Any = None, groups: Any = None,
              class_names: Sequence[str] | None = None, group_names: Sequence[str] | None = None,
              device: str | torch.device = "cpu") -> EvalCache:
        """Cache a split for ``model`` (PCBM or PCBM-h).

        ``data`` is an embedded split (with ``embeddings``, ``labels``, ``groups``), a tuple
        ``(embeddings, labels[, groups])``, or an embeddings tensor with ``labels=`` given.
        """
        if hasattr(data, "embeddings"):
            embeddings, labels = data.embeddings, data.labels
            groups = getattr(data, "groups", None) if groups is None else groups
        elif isinstance(data, tuple | list):
            embeddings, labels, *rest = data
            groups = rest[0] if rest and groups is None else groups
        else:
            embeddings = data
        if labels is None:
            raise ConfigError("EvalCache.build needs labels")
        head = _head_of(model)
        names = list(class_names) if class_names is not None else list(model.classes_)
        labels = check_labels(labels, embeddings.shape[0], len(names))
        group_idx, group_list = _group_indices(groups, group_names, embeddings.shape[0])
        device = torch.device(device)
        with torch.no_grad():
            features = head.transform(model.concept_scores(embeddings))
            logits = model.decision_function(embeddings)
        return cls(
            features_t=features.T.contiguous().to(device), labels=labels.to(device),
            groups=None if group_idx is None else group_idx.to(device), base_logits=logits.to(device),
            base_weight=head.weight_.to(device), base_bias=head.bias_.to(device),
            mean=head.mean_.clone(), scale=head.scale_.clone(),
            class_names=names, group_names=group_list, concept_names=list(model.bank.names),
        )

    def logits_for(self, model: Any) -> tuple[torch.Tensor, list[int]]:
        """Logits of ``model``'s head on this split by a low-rank update; also the changed columns."""
        head = _head_of(model)
        if head.weight_.shape != self.base_weight.shape:
            raise ConfigError(
                f"the head has shape {tuple(head.weight_.shape)} but the cache was built for "
                f"{tuple(self.base_weight.shape)} (concepts added or removed?); rebuild the cache"
            )
        if not (torch.equal(head.mean_, self.mean) and torch.equal(head.scale_, self.scale)):
            raise ConfigError("the head standardises concept scores differently; rebuild the cache")
        weight = head.weight_.to(self.base_weight.device)
        bias = head.bias_.to(self.base_bias.device)
        base_w, base_b = self.base_weight, self.base_bias
        cols = (weight != base_w).any(0).nonzero().flatten()
        if cols.numel() == 0 and torch.equal(bias, base_b):
            return self.base_logits, []
        # An edit is a few changed columns, possibly with whole rows rescaled (prune_normalize).
        # Write W' = diag(s) W + D with s the typical ratio W'/W of each row; then
        # logits' = logits * s + (b' - s * b) + Z[:, P] @ D[:, P].T, P the columns where D != 0.
        both = (weight != 0) & (base_w != 0)
        ratio = torch.where(both, weight / torch.where(both, base_w, 1.0), float("nan"))
        row_scale = ratio.nanmedian(1).values
        row_scale = torch.where(torch.isfinite(row_scale), row_scale, 1.0)
        resid = weight - row_scale[:, None] * base_w
        resid = torch.where(resid.abs() <= 4e-7 * weight.abs(), 0.0, resid)  # rounding of the rescale itself
        scaled_cols = resid.any(0).nonzero().flatten()
        if scaled_cols.numel() < cols.numel():
            logits = self.base_logits * row_scale + (bias - row_scale * base_b)
            return logits.addmm_(self.features_t[scaled_cols].T, resid[:, scaled_cols].T), cols.tolist()
        logits = torch.addmm(self.base_logits, self.features_t[cols].T, (weight[:, cols] - base_w[:, cols]).T)
        if not torch.equal(bias, base_b):
            logits += bias - base_b
        return logits, cols.tolist()

    def base_metrics(self) -> tuple[dict[str, Any], torch.Tensor]:
        """The cached model's report and predictions, computed once."""
        if self._base_report is None or self._base_pred is None:
            self._base_report = self.report(self.base_logits)
            self._base_pred = self.base_logits.argmax(1)
        return self._base_report, self._base_pred

    def report(self, logits: torch.Tensor) -> dict[str, Any]:
        """:func:`classification_report` of ``logits`` (or predictions) on this split."""
        return classification_report(logits, self.labels, self.groups, self.class_names, self.group_names or None)


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def preview_edits(cache: EvalCache, base: Any, new: Any, max_flips: int = 100) -> dict[str, Any]:
    """Before/after metrics of replacing ``base``'s head by ``new``'s on the cached split.

    Returns ``before`` and ``after`` reports (see :func:`classification_report`), their
    ``delta``, the ``changed_concepts`` and ``flips``: counts of changed predictions
    (``newly_correct``, ``newly_wrong``) and up to ``max_flips`` examples
    ``{index, old_pred, new_pred, label}``.
    """
    before_logits, _ = cache.logits_for(base)
    after_logits, _ = cache.logits_for(new)
    if before_logits is cache.base_logits:  # the usual case: reuse the cached model's metrics
        before, old_pred = cache.base_metrics()
    else:
        before, old_pred = cache.report(before_logits), before_logits.argmax(1)
    new_pred = after_logits.argmax(1)
    after = classification_report(new_pred, cache.labels, cache.groups, cache.class_names, cache.group_names or None)
    flipped = (old_pred != new_pred).nonzero().flatten()
    was_right = old_pred[flipped] == cache.labels[flipped]
    now_right = new_pred[flipped] == cache.labels[flipped]
    shown = flipped[: max(0, int(max_flips))]
    examples = [
        {"index": int(i), "old_pred": int(o), "new_pred": int(p), "label": int(y)}
        for i, o, p, y in zip(shown.tolist(), old_pred[shown].tolist(), new_pred[shown].tolist(),
                              cache.labels[shown].tolist(), strict=True)
    ]
    base_w, new_w = _head_of(base).weight_, _head_of(new).weight_
    changed = (base_w != new_w).any(0).nonzero().flatten().tolist()
    worst_before = before["worst_group"]["accuracy"] if before["worst_group"] else None
    worst_after = after["worst_group"]["accuracy"] if after["worst_group"] else None
    return {
        "before": before,
        "after": after,
        "delta": {
            "accuracy": _delta(after["accuracy"], before["accuracy"]),
            "balanced_accuracy": _delta(after["balanced_accuracy"], before["balanced_accuracy"]),
            "worst_group_accuracy": _delta(worst_after, worst_before),
        },
        "changed_concepts": [cache.concept_names[c] for c in changed],
        "flips": {
            "count": int(flipped.numel()),
            "newly_correct": int((now_right & ~was_right).sum()),
            "newly_wrong": int((was_right & ~now_right).sum()),
            "examples": examples,
            "truncated": int(flipped.numel()) > len(examples),
        },
    }
