"""Global edits of a PCBM's concept head: prune, reweight, restore, add a concept.

Edits are values (:class:`Edit`), applied purely: :func:`apply_edits` returns a new
model and a record of every weight it changed, and never touches its input. Because
the reproduction study found that pruning can *lower* target accuracy, callers are
expected to preview an edit (``ml.evaluation.preview_edits``) before committing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ml.concepts import check_embeddings, single_thread, text_concept_bank
from ml.errors import ConfigError
from ml.head import check_labels
from ml.pcbm import PCBM, PCBMHybrid

OPS = ("prune", "prune_normalize", "set", "scale", "restore")
_VALUE_OPS = ("set", "scale")
_FIELDS = ("op", "concept", "class_name", "value", "source")


@dataclass(frozen=True)
class Edit:
    """One global edit of the head's weights for a concept (and one class, or all)."""

    op: str  # one of OPS
    concept: str  # concept name
    class_name: str | None = None  # None: every class
    value: float | None = None  # the new weight (set) or the factor (scale)
    source: str | None = None  # who proposed it, e.g. "user", "tfti"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"unknown edit op {self.op!r}; expected one of {', '.join(OPS)}")
        if not isinstance(self.concept, str) or not self.concept:
            raise ConfigError("an edit needs a concept name")
        if self.class_name is not None and not isinstance(self.class_name, str):
            raise ConfigError(f"class_name must be a string or None, got {self.class_name!r}")
        if self.op in _VALUE_OPS:
            if self.value is None:
                raise ConfigError(f"a {self.op!r} edit needs a value")
            try:
                value = float(self.value)
            except (TypeError, ValueError):
                raise ConfigError(f"edit value must be a number, got {self.value!r}") from None
            if not math.isfinite(value):
                raise ConfigError(f"edit value must be finite, got {self.value!r}")
            object.__setattr__(self, "value", value)
        elif self.value is not None:
            raise ConfigError(f"a {self.op!r} edit takes no value")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Edit:
        if not isinstance(data, dict):
            raise ConfigError(f"an edit must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"unknown edit fields: {', '.join(unknown)}")
        missing = [k for k in ("op", "concept") if data.get(k) is None]
        if missing:
            raise ConfigError(f"edit is missing {', '.join(missing)}")
        return cls(**data)


def _rows(model: PCBM | PCBMHybrid, class_name: str | None) -> list[int]:
    if class_name is None:
        return list(range(len(model.classes_)))
    if class_name not in model.classes_:
        raise ConfigError(f"unknown class {class_name!r}; the model's classes are {', '.join(model.classes_[:20])}")
    return [model.classes_.index(class_name)]


def _column(model: PCBM | PCBMHybrid, concept: str) -> int:
    if concept not in model.bank.names:
        raise ConfigError(f"unknown concept {concept!r}: it is not in this model's concept bank")
    return model.bank.names.index(concept)


def _with_head(model: PCBM | PCBMHybrid, pcbm: PCBM) -> PCBM | PCBMHybrid:
    return model.copy(pcbm) if isinstance(model, PCBMHybrid) else pcbm


def apply_edits(model: PCBM | PCBMHybrid, edits: Iterable[Edit | dict], reference: PCBM | PCBMHybrid | None = None
                ) -> tuple[PCBM | PCBMHybrid, list[dict[str, Any]]]:
    """Apply ``edits`` in order to a copy of ``model``; returns (new model, records).

    Each record holds the edit (``op``, ``concept``, ``class``, ``value``, ``source``) and
    ``changes``: ``{"class", "concept", "old", "new"}`` for every weight it changed.
    ``restore`` copies weights back from ``reference`` (the original model).
    """
    base = model.pcbm if isinstance(model, PCBMHybrid) else model
    base.check_fitted()
    pcbm = base.copy()
    weight = pcbm.head.weight_  # a fresh clone owned by the copy
    records = []
    for raw in edits:
        edit = raw if isinstance(raw, Edit) else Edit.from_dict(raw)
        col = _column(pcbm, edit.concept)
        rows = _rows(pcbm, edit.class_name)
        before = weight.clone() if edit.op == "prune_normalize" else weight[rows, col].clone()
        for k in rows:
            if edit.op == "prune":
                weight[k, col] = 0.0
            elif edit.op == "prune_normalize":
                mass = weight[k].abs().sum()
                weight[k, col] = 0.0
                rest = weight[k].abs().sum()
                if rest > 0:  # keep the row's L1 norm; a row with nothing left stays zero
                    weight[k] *= mass / rest
            elif edit.op == "set":
                weight[k, col] = edit.value
            elif edit.op == "scale":
                weight[k, col] *= edit.value
            else:
                weight[k, col] = _reference_weight(reference, pcbm, edit.concept, k)
        if edit.op == "prune_normalize":
            changed = (weight != before).nonzero().tolist()
            changes = [(k, c, float(before[k, c]), float(weight[k, c])) for k, c in changed]
        else:
            changes = [(k, col, float(old), float(weight[k, col]))
                       for k, old in zip(rows, before.tolist(), strict=True) if float(weight[k, col]) != old]
        records.append({
            "op": edit.op, "concept": edit.concept, "class": edit.class_name, "value": edit.value,
            "source": edit.source,
            "changes": [{"class": pcbm.classes_[k], "concept": pcbm.bank.names[c], "old": old, "new": new}
                        for k, c, old, new in changes],
        })
    return _with_head(model, pcbm), records


def _reference_weight(reference: PCBM | PCBMHybrid | None, pcbm: PCBM, concept: str, row: int) -> float:
    if reference is None:
        raise ConfigError("a 'restore' edit needs the reference model to restore from")
    class_name = pcbm.classes_[row]
    if concept not in reference.bank.names:
        raise ConfigError(f"cannot restore {concept!r}: the reference model has no such concept")
    if class_name not in reference.classes_:
        raise ConfigError(f"cannot restore class {class_name!r}: the reference model has no such class")
    return float(reference.head.weight_[reference.classes_.index(class_name), reference.bank.names.index(concept)])


def add_text_concept(model: PCBM | PCBMHybrid, backbone: Any, phrase: str, embeddings: torch.Tensor, labels: Any,
                     templates: Sequence[str] | None = None, steps: int = 300
                     ) -> tuple[PCBM | PCBMHybrid, dict[str, Any]]:
    """Append a text concept and fit only its column of the head (all else frozen).

    The new column is fitted by FISTA on the head's own objective (mean cross-entropy
    plus the elastic net), with every other weight, the bias and the residual fixed.
    Returns the new model and a record of the added weights.
    """
    base = model.pcbm if isinstance(model, PCBMHybrid) else model
    base.check_fitted()
    new_bank = text_concept_bank(backbone, [phrase], templates)
    name = new_bank.names[0]
    if name in base.bank.names:
        raise ConfigError(f"the model already has a concept named {name!r}")
    ids = {base.bank.backbone_identity, new_bank.backbone_identity} - {""}
    if len(ids) > 1:
        raise ConfigError("the backbone given is not the one this model's concept bank was built with")
    embeddings = check_embeddings(embeddings, base.bank.dim)
    labels = check_labels(labels, embeddings.shape[0], len(base.classes_))
    bank = base.bank.concat(new_bank)
    head = base.head
    with torch.no_grad():
        logits = model.decision_function(embeddings)  # everything that stays frozen
        score = new_bank.project(embeddings)[:, 0]
        mean = score.mean() if head.standardize else torch.tensor(0.0)
        std = score.std(unbiased=False) if head.standardize else torch.tensor(1.0)
        scale = std if std > 1e-6 * (1 + mean.abs()) else torch.tensor(1.0)
        feature = (score - mean) / scale
        with single_thread(feature.numel() * logits.shape[1] <= 4_000_000):
            column = _fit_column(feature, logits, labels, float(head.lam), float(head.l1_ratio), int(steps))
    new_head = head.copy()
    new_head.weight_ = torch.cat([head.weight_, column[:, None]], 1)
    new_head.mean_ = torch.cat([head.mean_, mean.reshape(1)])
    new_head.scale_ = torch.cat([head.scale_, scale.reshape(1)])
    pcbm = PCBM(bank, new_head, base.classes_)
    record = {
        "op": "add_concept", "concept": name, "phrase": new_bank.info[0]["phrase"], "class": None,
        "source": "user",
        "changes": [{"class": c, "concept": name, "old": 0.0, "new": float(w)}
                    for c, w in zip(base.classes_, column.tolist(), strict=True) if w != 0.0],
    }
    return _with_head(model, pcbm), record


def _fit_column(feature: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lam: float, l1_ratio: float,
                steps: int) -> torch.Tensor:
    """FISTA on one new column w (K,): mean CE(logits + feature w') + elastic net on w."""
    n = feature.shape[0]
    l1, l2 = lam * l1_ratio, lam * (1 - l1_ratio)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    step = 1.0 / (0.5 * float((feature * feature).mean()) + l2 + 1e-12)  # Boehning bound on curvature
    w = torch.zeros(logits.shape[1])
    z, momentum = w.clone(), 1.0
    for _ in range(steps):
        probs = torch.softmax(logits + feature[:, None] * z, 1)
        grad = ((probs - onehot) * feature[:, None]).sum(0) / n + l2 * z
        target = z - step * grad
        nxt = torch.sign(target) * (target.abs() - step * l1).clamp_min(0.0)
        new_momentum = 0.5 * (1 + math.sqrt(1 + 4 * momentum * momentum))
        z = nxt + (momentum - 1) / new_momentum * (nxt - w)
        w, momentum = nxt, new_momentum
    return w
