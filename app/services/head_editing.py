"""The seam between the edit history and the library's editing code.

The history service stores and versions head states; *how* a list of edits turns one
head state into the next is delegated to a :class:`HeadEditor`. The app wires in an
editor built on ``ml.editing.apply_edits`` (which needs the model's concept bank, so it
lives with the model service); :class:`TensorHeadEditor` implements the same edit
operations directly on the head's ``weight`` matrix and is what the history is tested
with, independent of the rest of the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ml.errors import ConfigError, ShapeError

EDIT_OPS = ("prune", "prune_normalize", "set", "scale", "restore")  # as ml.editing.OPS
_VALUE_OPS = ("set", "scale")


@dataclass(frozen=True)
class HeadState:
    """A head as ``SparseLinearHead.state_dict()`` gives it: named tensors plus a JSON config."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """What an editor may need to know about the model it edits."""

    model_id: int
    kind: str
    concept_names: list[str]
    class_names: list[str]
    # The model's first version, which a "restore" edit copies weights back from (loaded on demand).
    initial_state: Callable[[], HeadState] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EditOutcome:
    state: HeadState
    records: list[dict[str, Any]]  # one JSON-able record per edit, kept in the version's history


class HeadEditor(Protocol):
    def __call__(self, model: ModelInfo, state: HeadState, edits: Sequence[Mapping[str, Any]]) -> EditOutcome:
        """Apply ``edits`` (dicts like ``ml.editing.Edit.to_dict()``) to ``state``; never mutate it."""
        ...


def _index(names: list[str], name: Any, what: str) -> int:
    if isinstance(name, str) and name in names:
        return names.index(name)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise ConfigError(f"unknown {what} {name!r}; known: {shown or 'none'}")


class TensorHeadEditor:
    """The edit ops of ``ml.editing`` on the ``weight`` matrix alone (same semantics, own records).

    prune / prune_normalize / set / scale / restore one concept's weights, for every class
    or one class; restore copies them back from the model's first version.
    """

    def __call__(self, model: ModelInfo, state: HeadState, edits: Sequence[Mapping[str, Any]]) -> EditOutcome:
        if not edits:
            raise ConfigError("nothing to edit: the list of edits is empty")
        weight = state.tensors.get("weight")
        if weight is None or weight.ndim != 2:
            raise ShapeError("the head has no 2-D 'weight' tensor (classes x concepts) to edit")
        n_classes, n_concepts = weight.shape
        if model.concept_names and len(model.concept_names) != n_concepts:
            raise ShapeError(f"the head has {n_concepts} concept columns but the bank names {len(model.concept_names)}")
        weight = weight.clone()
        records = []
        for edit in edits:
            op = edit.get("op")
            if op not in EDIT_OPS:
                raise ConfigError(f"unknown edit op {op!r}; choose one of {', '.join(EDIT_OPS)}")
            column = _index(model.concept_names, edit.get("concept"), "concept")
            class_name = edit.get("class_name")
            rows = list(range(n_classes)) if class_name is None else [_index(model.class_names, class_name, "class")]
            before = weight[rows, column].clone()
            value = edit.get("value")
            if op in _VALUE_OPS:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(f"a {op!r} edit needs a finite numeric 'value', got {value!r}")
            elif value is not None:
                raise ConfigError(f"a {op!r} edit takes no value")
            if op == "scale":
                weight[rows, column] *= float(value)
            elif op == "set":
                weight[rows, column] = float(value)
            elif op == "restore":
                if model.initial_state is None:
                    raise ConfigError("a 'restore' edit needs the model's first version to restore from")
                original = model.initial_state().tensors["weight"]
                if original.shape != weight.shape:
                    raise ShapeError("cannot restore: the first version's weights have another shape")
                weight[rows, column] = original[rows, column].to(weight.dtype)
            else:
                norms = weight[rows].abs().sum(dim=1)
                weight[rows, column] = 0.0
                if op == "prune_normalize":  # keep each row's L1 norm; a row with nothing left stays zero
                    remaining = weight[rows].abs().sum(dim=1)
                    factor = torch.where(remaining > 0, norms / remaining.clamp_min(1e-12), torch.ones_like(norms))
                    weight[rows] *= factor.unsqueeze(1)
            records.append({
                "op": op, "concept": model.concept_names[column], "concept_index": column,
                "class_name": class_name, "value": value,
                "before": [float(x) for x in before], "after": [float(x) for x in weight[rows, column]],
            })
        tensors = dict(state.tensors)
        tensors["weight"] = weight
        return EditOutcome(state=HeadState(tensors=tensors, config=dict(state.config)), records=records)
