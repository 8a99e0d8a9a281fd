"""A :class:`HeadEditor` that applies edits with the library (``ml.editing.apply_edits``).

``apply_edits`` works on a whole PCBM, so this editor needs the model's concept bank;
the model service, which keeps banks loaded, supplies it through ``bank_for``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.services.head_editing import EditOutcome, HeadState, ModelInfo

BankLoader = Callable[[ModelInfo], Any]  # -> ml.concepts.ConceptBank


class MlHeadEditor:
    def __init__(self, bank_for: BankLoader):
        self._bank_for = bank_for

    def _pcbm(self, bank: Any, state: HeadState, model: ModelInfo) -> Any:
        from ml.head import SparseLinearHead
        from ml.pcbm import PCBM

        head = SparseLinearHead.from_state(state.tensors, state.config)
        return PCBM(bank, head, class_names=model.class_names or None)

    def __call__(self, model: ModelInfo, state: HeadState, edits: Sequence[Mapping[str, Any]]) -> EditOutcome:
        from ml.editing import apply_edits
        from ml.errors import ConfigError

        if not edits:
            raise ConfigError("nothing to edit: the list of edits is empty")
        bank = self._bank_for(model)
        pcbm = self._pcbm(bank, state, model)
        reference = None
        if any(e.get("op") == "restore" for e in edits) and model.initial_state is not None:
            reference = self._pcbm(bank, model.initial_state(), model)
        edited, records = apply_edits(pcbm, [dict(e) for e in edits], reference=reference)
        tensors, config = edited.head.state_dict()
        return EditOutcome(state=HeadState(tensors=tensors, config=config), records=records)
